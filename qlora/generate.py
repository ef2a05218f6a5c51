"""Greedy answers of several adapters in the same model calls, and their scores.

    greedy(base, [(slot, prompts), ...], max_new_tokens) -> answers per slot, per prompt
    judge(base, [(slot, eval_examples, spec), ...]) -> (metrics, samples) per trial

All adapters' prompts go into one batch: each adapter's rows are one routing segment, exactly as
in training, so the frozen base runs once per new token for the whole pack. Prompts are left-padded
(attention mask, position ids counted over real tokens only) so rows of different lengths decode
together, with a KV cache (the base is loaded with `use_cache=False` for training; it is asked
for explicitly here). A row stops at the tokenizer's eos; the batch stops when every row has, or
at `max_new_tokens`. Greedy decoding of a row depends on its own tokens and adapter only, so a
packed adapter answers token for token what `PeftModel.generate` gives with that adapter alone.

Which prompts: the first `spec.eval_samples` examples of the trial's eval split (itself fixed by
the data's hash), so every trial on the same data answers the same prompts, side by side.
"""

from __future__ import annotations

import inspect
import math

import torch

from .adapters import routing_of
from .base import Base
from .config import IGNORE, TrialSpec
from .layer import Segment
from .metrics import BUILTIN, SAMPLES, load_metric, metric_name, score

GEN_BATCH_SIZE = 16  # prompts per adapter per generation call (rows = this x adapters)

__all__ = ["GEN_BATCH_SIZE", "SAMPLES", "greedy", "judge", "prompt_and_reference"]


@torch.no_grad()
def greedy(base: Base, parts: list[tuple[str, list[list[int]]]],
           max_new_tokens: int) -> list[list[list[int]]]:
    """Greedy continuations (eos excluded) of each (adapter slot, prompt token ids) pair's prompts,
    all adapters in the same calls, `GEN_BATCH_SIZE` prompts per adapter per call."""
    out: list[list[list[int]]] = [[] for _ in parts]
    if max_new_tokens < 1 or not any(prompts for _, prompts in parts):
        return [[[] for _ in prompts] for _, prompts in parts]
    routing = routing_of(base)
    base.model.eval()
    rounds = max(math.ceil(len(p) / GEN_BATCH_SIZE) for _, p in parts)
    try:
        for r in range(rounds):
            chunk = [(i, key, p[r * GEN_BATCH_SIZE:(r + 1) * GEN_BATCH_SIZE])
                     for i, (key, p) in enumerate(parts)]
            chunk = [c for c in chunk if c[2]]
            segments, start = [], 0
            for _, key, prompts in chunk:
                segments.append(Segment(key, start, start + len(prompts)))
                start += len(prompts)
            routing.segments = segments
            answers = _decode_rows(base, [p for _, _, prompts in chunk for p in prompts],
                                   max_new_tokens)
            for (i, _, _), seg in zip(chunk, segments, strict=True):
                out[i].extend(answers[seg.start:seg.end])
    finally:
        routing.segments = []
    return out


def _decode_rows(base: Base, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import DynamicCache

    tok, model, device = base.tokenizer, base.model, base.device
    eos, pad = tok.eos_token_id, tok.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every row's next token is at the end
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # transformers renamed `past_key_values` to `cache` (5.x); pass whichever the model takes.
    cache_kw = ("cache" if "cache" in inspect.signature(type(model).forward).parameters
                else "past_key_values")
    cache = {cache_kw: DynamicCache()}
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       use_cache=True, **cache, logits_to_keep=1).logits[:, -1]
        nxt = torch.where(done, pad, logits.argmax(-1))
        steps.append(nxt)
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
    tokens = torch.stack(steps, dim=1).tolist()
    answers = []
    for row in tokens:
        answers.append(row[:row.index(eos)] if eos in row else row)
    return answers


def prompt_and_reference(example) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids without eos) of an eval example: the prompt is its first
    `prompt_len` tokens (`qlora.data` records it), else the tokens before the first label."""
    ids = list(example.input_ids)
    n = getattr(example, "prompt_len", None)
    if n is None:
        n = next((i for i, lab in enumerate(example.labels) if lab != IGNORE), len(ids))
    return ids[:n], ids[n:]


def judge(base: Base, due: list[tuple[str, list, TrialSpec]]) -> list[tuple[dict, list[dict]]]:
    """Each trial's answers to its first `spec.eval_samples` eval prompts, generated together:
    per trial, (metrics {eval_exact_match, eval_token_f1, eval_<user metric>: mean},
    samples [{prompt, reference, prediction, <metric>: score}]). A trial with eval_samples 0
    gets ({}, [])."""
    tok = base.tokenizer
    eos = tok.eos_token_id
    picked = []
    for _, examples, spec in due:
        pairs = [prompt_and_reference(ex) for ex in examples[:spec.eval_samples]]
        # A row with no prompt beyond bos (plain text data) has nothing to answer.
        picked.append([(p, [t for t in r if t != eos]) for p, r in pairs
                       if any(t != tok.bos_token_id for t in p)])
    answers = greedy(base, [(key, [p for p, _ in pairs]) for (key, _, _), pairs
                            in zip(due, picked, strict=True)],
                     max((spec.eval_max_new_tokens for *_, spec in due), default=0))
    out = []
    for (_, _, spec), pairs, preds in zip(due, picked, answers, strict=True):
        if not pairs:
            out.append(({}, []))
            continue
        user = {metric_name(spec.eval_metric): load_metric(spec.eval_metric)} if spec.eval_metric \
            else {}
        samples = []
        for (prompt, ref), pred in zip(pairs, preds, strict=True):
            # A shorter budget than the pack's longest is a prefix of the same greedy answer.
            row = {"prompt": _text(tok, prompt), "reference": _text(tok, ref),
                   "prediction": _text(tok, pred[:spec.eval_max_new_tokens])}
            row.update(score(row["prediction"], row["reference"], user))
            samples.append(row)
        names = [*BUILTIN, *user]
        metrics = {f"eval_{n}": sum(s[n] for s in samples) / len(samples) for n in names}
        out.append((metrics, samples))
    return out


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
