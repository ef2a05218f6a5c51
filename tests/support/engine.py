"""What the engine tests share: a token-level dataset, a tiny base, and ways to compare results."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora import BaseSpec, DataSpec, load_base

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DATA = DataSpec(seq_len=48)


@dataclass
class Ex:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Tokenized:
    train: list
    eval: list


def examples(n: int, seed: int) -> list[Ex]:
    """Causal-LM examples of varied length whose second half is the response (prompt masked)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(12, 40, (1,), generator=gen))
        ids = [1] + torch.randint(4, 100, (length,), generator=gen).tolist()
        cut = length // 2
        out.append(Ex(ids, [-100] * cut + ids[cut:]))
    return out


def make_base(gc: bool, quant: str = "nf4", dtype: str = "float32"):
    return load_base(BaseSpec(quant_type=quant, compute_dtype=dtype, gradient_checkpointing=gc),
                     device=DEVICE)


def curve(result) -> list[float]:
    return result.train_losses + [loss for _, loss in result.eval_history]


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def by_id(results) -> dict:
    return {r.trial_id: r for r in results}
