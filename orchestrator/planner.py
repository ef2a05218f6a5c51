"""Packing: which trials share one loaded base on one worker.

Trials can share a pack only when they train on the same frozen weights (equal
`BaseSpec.fingerprint()`) under the same memory options and sequence length, because a pack runs one
forward and backward pass over a single base with one batch shape. Within such a group the planner
cuts as many packs as keep every worker busy, but never more adapters per pack than
`pack.max_adapters`, and balances their sizes so no pack is a straggler by construction.

Packing never changes a trial's numbers (each adapter has its own data, init and optimizer), so
the plan is free to choose by throughput alone, within memory: with a `memory_budget` (bytes per
worker) a pack holds at most as many adapters as `qlora.estimate_memory`, plus `MARGIN`, says fit
(counting the group's largest trials, so any pack of that size fits). A worker on CUDA checks
the estimate again against its free memory before it loads anything (`PackWorker.run_pack`).
"""

from __future__ import annotations

import math

from orchestrator.cluster.pack import MARGIN, Pack, estimate_bytes
from orchestrator.search.trials import Trial, pack_key
from qlora.config import stable_hash

__all__ = ["MARGIN", "Pack", "estimate_bytes", "fitting", "pack_key", "plan"]


def plan(trials: list[Trial], max_adapters: int, num_workers: int,
         memory_budget: int | None = None, device_type: str = "cpu",
         rows: dict | None = None) -> list[Pack]:
    """Split `trials` into packs of at most `max_adapters` that share a base and a seq_len.

    A group of n trials becomes max(ceil(n / max_adapters), min(n, num_workers)) packs whose sizes
    differ by at most one, each holding a contiguous run of the group in the order given. Groups
    keep the order of their first trial. With `memory_budget`, `max_adapters` is lowered per
    group to what fits it (see the module doc; at least 1). The result depends only on the
    arguments: pack ids are hashes of the base and the trial ids, so the same sweep gives the
    same plan on any machine.
    """
    if max_adapters < 1:
        raise ValueError(f"pack.max_adapters must be >= 1, got {max_adapters}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")

    groups: dict[tuple, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(pack_key(trial.base, trial.spec.data.seq_len), []).append(trial)

    packs: list[Pack] = []
    for group in groups.values():
        cap = max_adapters
        if memory_budget is not None:
            cap = fitting(group, max_adapters, memory_budget, device_type, rows)
        for chunk in _balanced_chunks(group, _num_packs(len(group), cap, num_workers)):
            index = len(packs)
            digest = stable_hash([chunk[0].base.fingerprint(), [t.trial_id for t in chunk]], 8)
            packs.append(Pack(pack_id=f"pack{index:03d}-{digest}", base=chunk[0].base,
                              trials=chunk))
    return packs


def fitting(group: list[Trial], max_adapters: int, budget: int, device_type: str,
            rows: dict | None = None) -> int:
    """The most adapters (1..max_adapters) of this group whose estimate, plus MARGIN, fits
    `budget`: counted with the group's most memory-hungry trials, so any such pack fits.
    `rows` ({DataSpec: RowTokens}) gives the data's longest rows (else seq_len)."""
    base = group[0].base
    specs = sorted((t.spec for t in group),
                   key=lambda s: estimate_bytes(base, [s], device_type, rows), reverse=True)
    k = 1
    while (k < min(max_adapters, len(specs))
           and estimate_bytes(base, specs[:k + 1], device_type, rows) * (1 + MARGIN) <= budget):
        k += 1
    return k


def _num_packs(n: int, max_adapters: int, num_workers: int) -> int:
    # Fewer, fuller packs amortise the base better, but an idle worker is worse than a smaller pack.
    return max(math.ceil(n / max_adapters), min(n, num_workers))


def _balanced_chunks(items: list, k: int) -> list[list]:
    size, extra = divmod(len(items), k)
    chunks, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks
