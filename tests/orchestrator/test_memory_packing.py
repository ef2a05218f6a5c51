"""Memory-aware packing: packs are cut so that the engine's memory estimate fits the budget,
and every trial's run records its pack's estimate and measured peak."""

from __future__ import annotations

import dataclasses

import pytest
from support import tiny_sweeps

from orchestrator.config.rules import parse_bytes
from orchestrator.config.schema import SweepDef
from orchestrator.planner import MARGIN, estimate_bytes, plan
from orchestrator.search.expand import expand
from orchestrator.tracking.keys import MEMORY_ESTIMATE_TAG, MEMORY_PEAK_TAG, PACK_TAG, TRIAL_ID_TAG


def _budget_for(trials, k: int, rows: dict | None = None) -> int:
    """A budget that holds the k most memory-hungry trials as one pack, and not k + 1."""
    base = trials[0].base
    hungry = sorted((t.spec for t in trials),
                    key=lambda s: estimate_bytes(base, [s], "cpu", rows), reverse=True)
    fits = estimate_bytes(base, hungry[:k], "cpu", rows) * (1 + MARGIN)
    too_many = estimate_bytes(base, hungry[:k + 1], "cpu", rows) * (1 + MARGIN)
    assert fits < too_many
    return int((fits + too_many) / 2)


def _trials(tmp_path):
    cfg = tiny_sweeps.config(tmp_path, SweepDef(name="mem_t", params=dict(tiny_sweeps.SPACE)))
    return expand(cfg)


@pytest.mark.parametrize("k", [2, 3])
def test_planner_cuts_packs_to_the_budget(tmp_path, k):
    trials = _trials(tmp_path)
    assert len(trials) == 6
    packs = plan(trials, max_adapters=6, num_workers=1, memory_budget=_budget_for(trials, k))
    assert [len(p.trials) for p in packs] == [k] * (6 // k)
    # max_adapters stays an upper bound under a generous budget.
    packs = plan(trials, max_adapters=2, num_workers=1, memory_budget=10**12)
    assert max(len(p.trials) for p in packs) == 2


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes(1024) == 1024
    assert parse_bytes(None) is None
    with pytest.raises(ValueError):
        parse_bytes("2 gigs")


@pytest.mark.slow
def test_sweep_under_a_budget_for_two_records_estimate_and_peak(ray_session, tmp_path):
    from orchestrator.cluster.datashare import prepare

    trials = _trials(tmp_path)
    rows = prepare(trials).rows  # the data's longest rows, as the sweep's planner gets them
    assert rows and all(r.tokens <= spec.seq_len for spec, r in rows.items())
    budget = _budget_for(trials, 2, rows)
    cfg = tiny_sweeps.config(tmp_path, SweepDef(name="mem_t", params=dict(tiny_sweeps.SPACE)),
                             max_adapters=4)
    cfg = dataclasses.replace(cfg, pack=dataclasses.replace(cfg.pack, memory_budget=str(budget)))
    run = tiny_sweeps.run(tmp_path, cfg)
    assert run.exit_code == 0
    assert len(run.children) == 6
    by_pack: dict[str, list] = {}
    for child in run.children.values():
        by_pack.setdefault(child.data.tags[PACK_TAG], []).append(child)
    assert sorted(len(c) for c in by_pack.values()) == [2, 2, 2]  # 6 trials, 1 worker
    specs = {t.trial_id: t.spec for t in trials}
    for children in by_pack.values():
        estimate = estimate_bytes(trials[0].base, [specs[c.data.tags[TRIAL_ID_TAG]]
                                                   for c in children], "cpu", rows)
        for child in children:
            assert int(child.data.tags[MEMORY_ESTIMATE_TAG]) == estimate <= budget
            assert int(child.data.tags[MEMORY_PEAK_TAG]) > 0
