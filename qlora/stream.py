"""Per-trial data streams and the packed batch.

A trial's order of examples is a fresh permutation per epoch drawn from a generator seeded by the
trial's seed and the epoch, so it depends on the trial alone, never on its pack. Its position
(epoch, offset) is all a checkpoint needs to continue the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import IGNORE, stable_hash

__all__ = ["IGNORE", "Batch", "TrialStream", "collate"]


class TrialStream:
    """Endless micro-batches of example indices for one trial."""

    def __init__(self, n_examples: int, batch_size: int, seed: int, epoch: int = 0,
                 offset: int = 0) -> None:
        if n_examples < 1:
            raise ValueError("a trial needs at least one training example")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> torch.Tensor:
        # A tensor, not a list: 8 bytes an example, where a list of ints costs ~36.
        gen = torch.Generator().manual_seed(int(stable_hash(("data", self.seed, epoch), 15), 16))
        return torch.randperm(self.n, generator=gen)

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.offset)
            out.extend(self._perm[self.offset:self.offset + take].tolist())
            self.offset += take
        return out

    def position(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor | None  # None for packed rows: position_ids carry the blocks
    labels: torch.Tensor
    bounds: list[tuple[int, int]]  # row range of each part, in the order given
    position_ids: torch.Tensor | None = None

    def model_inputs(self) -> dict:
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def collate(parts: list[list], pad_id: int, device: torch.device) -> Batch:
    """Concatenate per-adapter lists of Examples into one right-padded batch.

    Right padding and causal attention keep each real token's output independent of how much
    padding its row has, so a row computes the same alone or beside longer rows. Rows packed with
    several examples (`position_ids` set) go in with position ids and no 2-D mask; their padding
    restarts at position 0, so it is a block of its own that no real token attends to.
    """
    examples = [ex for part in parts for ex in part]
    packed = any(getattr(ex, "position_ids", None) is not None for ex in examples)
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.arange(width).repeat(len(examples), 1) if packed else None
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
        if packed:
            pos = getattr(ex, "position_ids", None)
            positions[i, :n] = torch.tensor(pos) if pos is not None else torch.arange(n)
            positions[i, n:] = torch.arange(width - n)
    bounds, start = [], 0
    for part in parts:
        bounds.append((start, start + len(part)))
        start += len(part)
    return Batch(ids.to(device), None if packed else mask.to(device), labels.to(device), bounds,
                 None if positions is None else positions.to(device))
