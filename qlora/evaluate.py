"""Evaluation: the token-weighted loss of each adapter on its examples, every due adapter in the
same model calls; a mixture's sources each as a part of their own."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .adapters import routing_of
from .base import Base
from .layer import Segment
from .stream import IGNORE, collate

__all__ = ["EVAL_BATCH_SIZE", "evaluate", "eval_sums", "eval_by_source", "token_loss",
           "adapter_logits"]

EVAL_BATCH_SIZE = 8


def eval_by_source(base: Base, items: list[tuple[str, object]]) -> list[dict[str, float]]:
    """{'eval_loss': ..., 'eval_loss_<label>': ... per source of a mixture} for each (adapter
    slot, TokenizedData): the overall loss is token-weighted over every source."""
    parts, owners = [], []
    for n, (key, data) in enumerate(items):
        mixed = getattr(data, "parts", ())  # (data of other kinds may not have it)
        sources = data.eval.parts if mixed else [data.eval]
        for label, examples in zip([p[0] for p in mixed] or [None], sources, strict=True):
            if len(examples):
                parts.append((key, examples))
                owners.append((n, label))
    sums, counts = eval_sums(base, parts) if parts else ([], [])
    got: list[dict] = [{} for _ in items]
    for (n, label), total, tokens in zip(owners, sums, counts, strict=True):
        got[n][label] = (total, tokens)
    out = []
    for per in got:
        loss = sum(t for t, _ in per.values()) / max(1, sum(c for _, c in per.values()))
        out.append({"eval_loss": loss,
                    **{f"eval_loss_{k}": t / c for k, (t, c) in per.items() if k and c}})
    return out


def evaluate(base: Base, parts: list[tuple[str, list]]) -> list[float]:
    """Token-weighted mean loss of each (adapter slot, examples) pair, evaluated together."""
    sums, counts = eval_sums(base, parts)
    return [s / max(1, c) for s, c in zip(sums, counts, strict=True)]


@torch.no_grad()
def eval_sums(base: Base, parts: list[tuple[str, list]]) -> tuple[list[float], list[int]]:
    """(summed token loss, number of tokens) of each (adapter slot, examples) pair, evaluated
    together; a slot may appear in several pairs (a mixture's sources)."""
    model = base.model
    model.eval()
    sums = [0.0] * len(parts)
    counts = [0] * len(parts)
    rounds = max(math.ceil(len(ex) / EVAL_BATCH_SIZE) for _, ex in parts)
    routing = routing_of(base)
    for r in range(rounds):
        chunk = [(i, key, ex[r * EVAL_BATCH_SIZE:(r + 1) * EVAL_BATCH_SIZE])
                 for i, (key, ex) in enumerate(parts)]
        chunk = [c for c in chunk if c[2]]
        batch = collate([c[2] for c in chunk], base.tokenizer.pad_token_id, base.device)
        segments = [Segment(key, a, b) for (_, key, _), (a, b)
                    in zip(chunk, batch.bounds, strict=True)]
        with routing.route(segments):
            hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state
        for (i, _, _), (start, end) in zip(chunk, batch.bounds, strict=True):
            total, n_tokens = token_loss(model, hidden, batch.labels, start, end)
            sums[i] += total.item()
            counts[i] += n_tokens
    return sums, counts


@torch.no_grad()
def adapter_logits(base: Base, slot: str, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the base with adapter `slot` alone (eval mode): for checks against PEFT."""
    base.model.eval()
    with routing_of(base).route([Segment(slot, 0, input_ids.shape[0])]):
        return base.model(input_ids=input_ids.to(base.device),
                          attention_mask=None if attention_mask is None
                          else attention_mask.to(base.device)).logits


def token_loss(model, hidden: torch.Tensor, labels: torch.Tensor, start: int,
                end: int) -> tuple[torch.Tensor, int]:
    """Summed next-token loss of rows [start, end) and how many tokens it covers.

    Logits are formed for these rows only, so at most one segment's logits exist at a time.
    """
    head = model.get_output_embeddings()
    targets = labels[start:end, 1:]
    logits = head(hidden[start:end, :-1].to(head.weight.dtype)).float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())
