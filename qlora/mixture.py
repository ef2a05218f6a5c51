"""Training on a mixture of datasets (`DataSpec.mix`): each source tokenized and split on its own,
rows drawn from them by weight.

A mixture's train split is the sources' train splits one after the other, and so is its eval
split; `TokenizedData.parts` says where each source's rows are. A trial's stream (`MixStream`)
draws, for every example, a source with probability weight / (sum of weights), then that
source's next example in an order of its own; both draws come from generators seeded by the
trial's seed (and the epoch, and the source), so a trial's stream depends on its seed alone,
never on its pack. Each source has its own deterministic eval split, and a trial reports
`eval_loss_<label>` for each beside the overall `eval_loss` (token-weighted over all of them).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from dataclasses import replace

import torch

from .config import DataSpec, MixSource, stable_hash
from .tokens import ReadOnly

__all__ = ["parts_of", "mixture", "Concat", "MixStream", "stream_for"]


def parts_of(spec: DataSpec) -> list[tuple[MixSource, DataSpec]]:
    """Each source of a mixture with the DataSpec that loads it alone."""
    return [(m, replace(spec, path=m.path, name=m.name, split=m.split, revision=m.revision,
                        format=m.format or spec.format, eval_path=None, mix=()))
            for m in spec.mix]


class Concat(ReadOnly):
    """Sequences one after the other, read in place."""

    def __init__(self, parts: list[Sequence]) -> None:
        self._parts = parts
        self._starts = [0]
        for p in parts:
            self._starts.append(self._starts[-1] + len(p))

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def parts(self) -> list[Sequence]:
        return list(self._parts)

    def longest(self) -> tuple[int, int]:
        """The parts' `longest()` (tokens, kept labels), each the most over every part."""
        got = [p.longest() for p in self._parts]
        return max(t for t, _ in got), max(k for _, k in got)

    def _item(self, i: int):
        p = bisect.bisect_right(self._starts, i) - 1
        return self._parts[p][i - self._starts[p]]


def mixture(spec: DataSpec, loaded: list):
    """The TokenizedData of a mixture from its sources' own (in `spec.mix` order)."""
    from .data import TokenizedData

    total = sum(m.weight for m in spec.mix)
    parts, stats = [], {"n_rows": 0, "n_train": 0, "n_eval": 0, "n_truncated": 0,
                        "n_dropped": 0, "n_skipped": 0}
    for m, d in zip(spec.mix, loaded, strict=True):
        parts.append((m.label, m.weight / total, len(d.train), len(d.eval)))
        for k in stats:
            stats[k] += d.stats.get(k, 0)
    stats["format"] = "mix"
    stats["sources"] = {m.label: {"share": round(m.weight / total, 6), "n_train": len(d.train),
                                  "n_eval": len(d.eval), "data_hash": d.data_hash,
                                  "format": d.stats.get("format")}
                        for m, d in zip(spec.mix, loaded, strict=True)}
    data_hash = hashlib.sha256(":".join(
        f"{m.label}={m.weight}@{d.data_hash}" for m, d in zip(spec.mix, loaded, strict=True)
    ).encode()).hexdigest()[:16]
    return TokenizedData(Concat([d.train for d in loaded]), Concat([d.eval for d in loaded]),
                         data_hash, stats, parts=tuple(parts))


class MixStream:
    """Endless micro-batches of indices into a mixture's train split (see the module doc). An
    epoch is sum(sizes) draws; (epoch, offset) is all a checkpoint needs, as for TrialStream."""

    def __init__(self, sizes: list[int], shares: list[float], batch_size: int, seed: int,
                 epoch: int = 0, offset: int = 0) -> None:
        if min(sizes) < 1:
            raise ValueError("every source of a mixture needs a training example")
        self.sizes, self.batch_size, self.seed = list(sizes), batch_size, seed
        self.shares = torch.tensor(shares, dtype=torch.float64)
        self.length = sum(sizes)
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.epoch, self.offset = epoch, offset
        drawn = [0] * len(sizes)  # each source's draws before (epoch, offset)
        for e in range(epoch + 1):
            upto = offset if e == epoch else self.length
            counts = torch.bincount(self._choices(e)[:upto], minlength=len(sizes))
            drawn = [a + int(b) for a, b in zip(drawn, counts.tolist(), strict=True)]
        self._drawn = drawn
        self._orders: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (its pass, order)
        self._current = self._choices(epoch)

    def _gen(self, *what) -> torch.Generator:
        return torch.Generator().manual_seed(int(stable_hash(("mix", self.seed, *what), 15), 16))

    def _choices(self, epoch: int) -> torch.Tensor:
        return torch.multinomial(self.shares, self.length, replacement=True,
                                 generator=self._gen("choices", epoch))

    def _index(self, source: int) -> int:
        k = self._drawn[source]
        self._drawn[source] += 1
        n = self.sizes[source]
        epoch, order = self._orders.get(source, (None, None))
        if epoch != k // n:  # this source's next pass: a fresh order of its own
            epoch, order = k // n, torch.randperm(n, generator=self._gen("order", source, k // n))
            self._orders[source] = (epoch, order)
        return self.starts[source] + int(order[k % n])

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.offset >= self.length:
                self.epoch, self.offset = self.epoch + 1, 0
                self._current = self._choices(self.epoch)
            out.append(self._index(int(self._current[self.offset])))
            self.offset += 1
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def stream_for(data, batch_size: int, seed: int, **position):
    """The stream of a trial on `data`: a MixStream for a mixture, else a TrialStream."""
    from .stream import TrialStream

    if getattr(data, "parts", ()):
        return MixStream([p[2] for p in data.parts], [p[1] for p in data.parts], batch_size,
                         seed, **position)
    return TrialStream(len(data.train), batch_size, seed, **position)
