"""Per-adapter optimisation: one optimizer (one parameter group) per adapter, its own schedule.

An optimizer per adapter, rather than one optimizer with a group per adapter, makes adding a
trial into a running pack (backfill) and dropping one (early stop, divergence) trivial, and keeps
each trial's optimizer state its own for checkpoints. Clipping is per adapter: one adapter's
large gradient never scales another's.
"""

from __future__ import annotations

import math
import warnings

import torch

from .config import TrialSpec


def build_optimizer(params: list[torch.nn.Parameter], spec: TrialSpec) -> torch.optim.Optimizer:
    """The optimizer `spec.optimizer` names, over one adapter's parameters."""
    kwargs = dict(lr=spec.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=spec.weight_decay)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[spec.optimizer]
    with warnings.catch_warnings():
        # On a CPU, bitsandbytes falls back from paged to ordinary memory and says so each time.
        warnings.filterwarnings("ignore", message=".*[Pp]aged.*")
        return cls(params, **kwargs)


def lr_at(spec: TrialSpec, step: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then the decay.

    Same shape as transformers' `get_{cosine,linear,constant}_schedule_with_warmup`.
    """
    base, warmup = spec.learning_rate, spec.warmup  # warmup_steps, or from warmup_ratio
    if step < warmup:
        return base * step / max(1, warmup)
    if spec.lr_schedule == "constant":
        return base
    progress = (step - warmup) / max(1, spec.max_steps - warmup)
    if spec.lr_schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm of these parameters' gradients (0 when none have one)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_(params: list[torch.nn.Parameter], norm: torch.Tensor, max_norm: float) -> None:
    """Scale these gradients so that their norm is at most `max_norm` (0 = no clipping)."""
    if max_norm <= 0:
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
