"""`train_pack`: K independent trials trained together on one frozen base, step by step.

What the recipe does, in the order it runs:

1. **Open a slot per trial.** Inject its adapter (own rank, alpha, dropout, init seed), build its
   optimizer (own learning rate, schedule, clipping) and its data stream (own order). A trial
   given `num_epochs` gets its `max_steps` from its train split here (`TrialSpec.resolved`); its
   result's `spec` is the resolved one.
2. **One micro-step for all.** Each active trial contributes its micro-batch as one row segment;
   the base runs once over all rows, each adapter adds its path to its own rows.
3. **Loss = sum of per-trial mean token losses**, so each adapter's gradient is its own data's.
   A trial whose loss is NaN/inf is left out of the sum and stopped as diverged.
4. **Per trial, every `grad_accum_steps` micro-steps:** its gradient norm (NaN/inf: diverged),
   clipping of its own gradients, its learning rate for the step, its optimizer step.
5. **Evaluate** trials that are due (every `eval_every` steps and at the end) together, each on
   its own held-out split; with `eval_samples`, each also answers held-out prompts greedily, all
   in the same model calls (`qlora.generate`): scores join `eval_loss`, answers come under
   `samples` (`qlora.metrics.SAMPLES`). Metrics go through `on_metrics`, which may stop a trial.
6. **Close** finished trials: export the adapter in PEFT's format, report through `on_trial_end`,
   free the slot and fill it from `next_trial` (backfill) without touching the base.

Trade-offs: evaluation of K trials costs K passes' worth of rows (each adapter needs its own
outputs); a pack's LoRA matmuls run batched over its adapters (qlora/layer.py), and logits are
formed one segment at a time, so at most one segment's logits exist at once.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint
from .adapters import adapter_state, inject, load_adapter_state, remove, routing_of
from .base import Base
from .config import DataSpec, TrialSpec, TrialStatus
from .data import data_info
from .evaluate import eval_by_source, token_loss
from .exploit import Exploit, align, exploit_round, set_values
from .export import adapter_files
from .generate import SAMPLES, judge
from .layer import Segment, label
from .mixture import stream_for
from .optim import build_optimizer, clip_, grad_norm, lr_at
from .result import TrialResult
from .stream import TrialStream, collate

MetricsCallback = Callable[[str, int, dict], "bool | None"]
log = logging.getLogger(__name__)
FENCED = ("fenced: a later attempt at this trial (sent again after this worker was taken for "
          "lost) holds its checkpoints")


@dataclass
class _Slot:
    spec: TrialSpec
    key: str
    params: list
    optimizer: torch.optim.Optimizer
    stream: TrialStream
    data: object  # qlora.data.TokenizedData
    step: int = 0
    micro: int = 0
    pending: list = field(default_factory=list)  # micro-batch losses of the current step
    train_losses: list = field(default_factory=list)
    eval_history: list = field(default_factory=list)  # (step, eval_loss)
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation's metrics
    samples: list = field(default_factory=list)  # and its generated answers
    result: TrialResult | None = None
    eval_due: bool = False
    saved_step: int = 0
    closed: bool = False
    overrides: dict = field(default_factory=dict)  # hyperparameters an exploit changed
    exploits: list = field(default_factory=list)  # each: step, source, values

    @property
    def done(self) -> bool:
        return self.result is not None


def train_pack(
    base: Base,
    trials: list[TrialSpec],
    *,
    on_metrics: MetricsCallback | None = None,
    on_trial_end: Callable[[TrialResult], None] | None = None,
    next_trial: Callable[[], TrialSpec | None] | None = None,
    exploit: Callable[[list], dict[str, Exploit]] | None = None,
    datasets: dict[DataSpec, object] | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    owner: str | None = None,
) -> list[TrialResult]:
    """Train `trials` together on `base`; return one TrialResult per trial, in the order they ended.

    `exploit` (population-based training: `qlora.exploit.exploit_round`) hears each evaluation
    round, [(trial_id, step, metrics, values, form)], and names trials that take another's state.

    Each trial's numbers equal those of the same trial trained alone (float tolerance). The base
    holds no adapter afterwards and may train the next pack. `datasets` may supply tokenized data
    per DataSpec (otherwise `qlora.data.load_data` reads it, once per distinct spec).

    With `checkpoint_dir`, each trial is checkpointed every `checkpoint_every` steps (0: only when
    it ends) under `<checkpoint_dir>/<trial_id>/`, and a trial that has a checkpoint there continues
    from it: the steps after the checkpoint reproduce the uninterrupted run.

    `owner` names this attempt at the trials (a worker's token): each trial is claimed for it as
    its slot opens (`checkpoint.claim`), and a checkpoint is written only while the claim stands.
    A trial claimed since by a later attempt (sent again after this worker was taken for lost)
    ends FAILED, "fenced", writing nothing more.
    """
    if len({t.trial_id for t in trials}) != len(trials):
        raise ValueError("trial ids in a pack must be distinct")
    capacity = max(1, len(trials))
    data_cache: dict[DataSpec, object] = dict(datasets or {})
    slots: list[_Slot] = []
    results: list[TrialResult] = []
    try:
        for spec in trials:
            slots.append(_open_slot(base, spec, data_cache, checkpoint_dir, owner))
        if exploit is not None and checkpoint_dir is not None:  # PBT: a pack's rounds, one step
            given = {t.trial_id: t for t in trials}
            slots = align(slots, lambda s, step: _reopen(base, given[s.spec.trial_id], s,
                                                         data_cache, checkpoint_dir, step))
        while True:
            for slot in slots:  # trials that ended last round, or were restored already ended
                if slot.done and not slot.closed:
                    _close_slot(base, slot, results, on_trial_end)
            active = [s for s in slots if not s.done]
            if next_trial is not None and len(active) < capacity:
                spec = next_trial()
                if spec is None:
                    next_trial = None
                else:
                    slots.append(_open_slot(base, spec, data_cache, checkpoint_dir, owner))
                continue  # close it at once if it was restored ended; ask again if room is left
            if not active:
                break
            _micro_step(base, active, on_metrics)
            due = [s for s in active if s.eval_due and not s.done]
            if due:
                _evaluate_and_report(base, due, on_metrics)
                if exploit is not None:
                    exploit_round(base, slots, due, exploit, on_metrics)
            if checkpoint_dir is not None:
                for slot in active:
                    _maybe_checkpoint(base, slot, checkpoint_dir, checkpoint_every, owner)
    finally:
        for slot in slots:
            remove(base, slot.key)
    return results


# -- slots -------------------------------------------------------------------------------------

def _open_slot(base: Base, spec: TrialSpec, data_cache: dict, checkpoint_dir=None,
               owner: str | None = None) -> _Slot:
    if spec.data not in data_cache:
        from .data import load_data

        data_cache[spec.data] = load_data(spec.data, base.tokenizer)
    data = data_cache[spec.data]
    spec = spec.resolved(len(data.train))  # num_epochs -> max_steps, from this train split
    key = f"t{spec.trial_id}"
    params = inject(base, key, spec)
    slot = _Slot(
        spec=spec, key=key, params=params, optimizer=build_optimizer(params, spec),
        stream=stream_for(data, spec.micro_batch_size, spec.seed), data=data,
    )
    if checkpoint_dir and owner:
        checkpoint.claim(checkpoint_dir, spec.trial_id, owner)
    saved = checkpoint.load(checkpoint_dir, spec.trial_id) if checkpoint_dir else None
    if saved is not None:
        _restore(base, slot, *saved)
    if not data.eval and not slot.done:  # an eval_loss over no token would read 0.0, the best
        _end(slot, TrialStatus.FAILED, "its eval split holds no example (none held out, or all "
                                       "dropped at its seq_len): nothing to judge it by")
    return slot


def _reopen(base: Base, spec: TrialSpec, slot: _Slot, data_cache, root, step: int) -> _Slot:
    """`spec`'s slot again from its checkpoint of `step` (fresh at 0); `slot` if none is kept."""
    saved = checkpoint.load(root, spec.trial_id, step) if step else None
    if step and saved is None:
        return slot
    remove(base, slot.key)
    fresh = _open_slot(base, spec, data_cache)
    if saved is not None:
        _restore(base, fresh, *saved)
    return fresh


def _restore(base: Base, slot: _Slot, adapter: dict, optimizer_state: dict, state: dict) -> None:
    load_adapter_state(base, slot.key, adapter)
    if optimizer_state["state"]:
        slot.optimizer.load_state_dict(optimizer_state)
    slot.step, slot.micro, slot.saved_step = state["step"], state["micro"], state["step"]
    slot.stream = stream_for(slot.data, slot.spec.micro_batch_size, slot.spec.seed,
                             **state["data_position"])
    slot.train_losses = list(state["train_losses"])
    slot.eval_history = [tuple(e) for e in state["eval_history"]]
    slot.eval_metrics, slot.samples = state.get("eval_metrics", {}), state.get("samples", [])
    slot.exploits, slot.overrides = list(state.get("exploits", [])), state.get("overrides", {})
    slot.spec = set_values(base, slot.key, slot.optimizer, slot.spec, slot.overrides)
    if state.get("status"):
        _end(slot, TrialStatus(state["status"]), state.get("reason"))


def _maybe_checkpoint(base: Base, slot: _Slot, root, every: int, owner: str | None) -> None:
    """Checkpoint after a step's evaluations, every `every` steps and when the trial ends."""
    if slot.step == slot.saved_step and not slot.done:
        return
    ended_well = slot.done and slot.result.status.succeeded
    if not (ended_well or (every and slot.step % every == 0 and not slot.done)):
        return
    state = {"trial_id": slot.spec.trial_id, "step": slot.step, "micro": slot.micro,
             "data_position": slot.stream.position(), "train_losses": slot.train_losses,
             "eval_history": slot.eval_history, "eval_metrics": slot.eval_metrics,
             "samples": slot.samples, "overrides": slot.overrides, "exploits": slot.exploits}
    if ended_well:
        state.update(status=slot.result.status, reason=slot.result.reason)
    if owner and not checkpoint.holds(root, slot.spec.trial_id, owner):
        log.warning("trial %s at step %d: %s; this attempt (%s) writes nothing more",
                    slot.spec.trial_id, slot.step, FENCED, owner)
        _end(slot, TrialStatus.FAILED, FENCED)
        return
    checkpoint.save(root, slot.spec.trial_id, adapter_state(base, slot.key), slot.optimizer, state)
    slot.saved_step = slot.step


def _close_slot(base: Base, slot: _Slot, results: list, on_trial_end) -> None:
    result = slot.result
    if result.status.succeeded:
        result.adapter = adapter_files(base, slot.key, slot.spec)
    remove(base, slot.key)
    slot.closed = True
    slot.optimizer.state.clear()
    slot.params.clear()
    results.append(result)
    if on_trial_end is not None:
        on_trial_end(result)


def _end(slot: _Slot, status: TrialStatus, reason: str | None = None) -> None:
    slot.result = TrialResult(
        trial_id=slot.spec.trial_id, status=status, steps=slot.step,
        eval_loss=slot.eval_history[-1][1] if slot.eval_history else None,
        train_losses=list(slot.train_losses), eval_history=list(slot.eval_history), reason=reason,
        data=data_info(slot.data), spec=slot.spec, eval_metrics=dict(slot.eval_metrics),
        samples=list(slot.samples), exploits=list(slot.exploits),
    )


# -- one micro-step for every active trial ------------------------------------------------------

def _micro_step(base: Base, active: list[_Slot], on_metrics) -> None:
    for slot in active:
        if slot.spec.inject_oom_at_step is not None and slot.step + 1 == slot.spec.inject_oom_at_step:
            raise torch.OutOfMemoryError(
                f"injected out-of-memory at step {slot.step + 1} (trial {slot.spec.trial_id})")
    with label("qlora.data"):
        parts = [[slot.data.train[i] for i in slot.stream.next_indices()] for slot in active]
        batch = collate(parts, base.tokenizer.pad_token_id, base.device)
    segments = [Segment(s.key, a, b, tick=s.micro, width=s.spec.data.seq_len)
                for s, (a, b) in zip(active, batch.bounds, strict=True)]
    base.model.train()
    offload = (torch.autograd.graph.save_on_cpu(pin_memory=True)
               if base.spec.activation_offload and base.device.type == "cuda"
               else contextlib.nullcontext())
    with routing_of(base).route(segments):
        with offload, label("qlora.forward"):
            losses = _segment_losses(base, batch)
        total = None
        for slot, loss in zip(active, losses, strict=True):
            if not torch.isfinite(loss):
                _end(slot, TrialStatus.DIVERGED,
                     f"diverged at step {slot.step + 1}: loss is {loss.item()}")
                continue
            slot.pending.append(loss.item())
            scaled = loss / slot.spec.grad_accum_steps
            total = scaled if total is None else total + scaled
        if total is not None:
            with label("qlora.backward"):
                total.backward()
    for slot in active:
        slot.micro += 1
        if slot.done:
            _drop_grads(slot)
        elif slot.micro % slot.spec.grad_accum_steps == 0:
            _optimizer_step(slot, on_metrics)


def _segment_losses(base: Base, batch) -> list[torch.Tensor]:
    """Each segment's mean token loss; logits are formed one segment at a time to bound memory."""
    model = base.model
    hidden = model.get_decoder()(**batch.model_inputs()).last_hidden_state
    losses = []
    for start, end in batch.bounds:
        total, n_tokens = token_loss(model, hidden, batch.labels, start, end)
        losses.append(total / max(1, n_tokens))
    return losses


def _drop_grads(slot: _Slot) -> None:
    for p in slot.params:
        p.grad = None


def _optimizer_step(slot: _Slot, on_metrics) -> None:
    spec = slot.spec
    norm = grad_norm(slot.params)
    if not torch.isfinite(norm):
        _drop_grads(slot)
        _end(slot, TrialStatus.DIVERGED, f"diverged at step {slot.step + 1}: gradient norm is {norm.item()}")
        return
    clip_(slot.params, norm, spec.max_grad_norm)
    lr = lr_at(spec, slot.step)
    for group in slot.optimizer.param_groups:
        group["lr"] = lr
    with warnings.catch_warnings():
        # bitsandbytes says at each step, on a CPU, that paged optimizers fall back to unpaged.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported")
        with label("qlora.optimizer"):
            slot.optimizer.step()
    slot.optimizer.zero_grad(set_to_none=True)
    slot.step += 1
    train_loss = sum(slot.pending) / len(slot.pending)
    slot.pending.clear()
    slot.train_losses.append(train_loss)
    metrics = {"train_loss": train_loss, "lr": lr, "grad_norm": norm.item()}
    if on_metrics is not None and on_metrics(spec.trial_id, slot.step, metrics):
        _end(slot, TrialStatus.STOPPED, f"stopped early at step {slot.step}")
        return
    at_end = slot.step >= spec.max_steps
    if at_end or (spec.eval_every and slot.step % spec.eval_every == 0):
        slot.eval_due = True


# -- evaluation ---------------------------------------------------------------------------------

def _evaluate_and_report(base: Base, due: list[_Slot], on_metrics) -> None:
    with label("qlora.eval"):
        per_slot = eval_by_source(base, [(s.key, s.data) for s in due])
    with label("qlora.generate"):  # every due trial answers in the same model calls
        judged = judge(base, [(s.key, s.data.eval, s.spec) for s in due])
    for slot, losses, (scores, samples) in zip(due, per_slot, judged, strict=True):
        slot.eval_due = False
        slot.eval_history.append((slot.step, losses["eval_loss"]))
        slot.eval_metrics, slot.samples = {**losses, **scores}, samples
        metrics = {**slot.eval_metrics, **({SAMPLES: samples} if samples else {})}
        stop = on_metrics is not None and on_metrics(slot.spec.trial_id, slot.step, metrics)
        if slot.step >= slot.spec.max_steps:
            _end(slot, TrialStatus.FINISHED)
        elif stop:
            _end(slot, TrialStatus.STOPPED, f"stopped early at step {slot.step}")
