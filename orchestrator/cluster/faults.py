"""What happens to a pack's trials when its worker is lost or its device runs out of memory.

Workers checkpoint each trial (`checkpoint_dir`, every `checkpoint_every` steps and at its end),
so a trial sent again continues from its last checkpoint, and one whose checkpoint says it ended
returns its result at once, without training.

- A lost worker (`RayActorError`: process killed or crashed, node lost, host OOM kill): the
  pack's trials that have no final result go again, as a new pack, up to `max_retries` times each
  (`PackRetried`, cause "worker_lost"); then they fail with the reason. A trial whose end
  (diverged) was streamed before the loss keeps that end.
- A hung worker (its pack reported nothing for `cluster.hang_timeout_s`: a stuck collective, a
  driver deadlock, a node cut off from the head) is killed, and its pack handled as a lost
  worker's (`WorkerHung`). If it comes back, its trials' checkpoints are no longer its own
  (`qlora.checkpoint.claim`) and the driver takes nothing more from its pack.
- Out of device memory (`torch.OutOfMemoryError`): the driver halves the pack and sends both
  halves again (`PackRetried`, cause "oom"). A trial alone that still does not fit fails, saying
  what to lower.
"""

from __future__ import annotations

import time
from dataclasses import replace

from orchestrator.cluster.events import (
    PackOutcome,
    PackRetried,
    TrialEnded,
    failed_result,
    first_line,
    trial_result,
)
from orchestrator.cluster.pack import Pack
from qlora.config import TrialStatus


class WorkerHung(Exception):
    """A placed worker whose pack reported nothing for `cluster.hang_timeout_s`: killed, and its
    pack's trials handled as after any lost worker."""


def after_lost_worker(pack: Pack, error: BaseException, streamed: dict[str, TrialEnded],
                      restarts: dict[str, int], max_retries: int
                      ) -> tuple[PackOutcome, list[tuple[Pack, PackRetried]]]:
    """The outcome of a pack whose worker was lost, and the pack that sends its trials again.

    A trial whose failure (diverged) was streamed keeps it. Every other trial goes again while it
    has restarts left (`restarts` is updated); a finished one's checkpoint returns it at once.
    """
    reason = f"worker lost: {type(error).__name__}: {first_line(error)}"
    final, again = [], []
    for trial in pack.trials:
        tid = trial.trial_id
        end = streamed.get(tid)
        if end is not None and not TrialStatus(end.status).succeeded:
            final.append(trial_result(tid, end.status, end.steps, end.eval_loss, end.reason))
        elif restarts.get(tid, 0) < max_retries:
            restarts[tid] = restarts.get(tid, 0) + 1
            again.append(trial)
        else:
            tries = restarts.get(tid, 0)
            final.append(failed_result(tid, f"{reason} (after {tries} restart{'s' * (tries != 1)}; "
                                      "cluster.max_retries)"))
    outcome = PackOutcome(pack.pack_id, final, None, None, time.time(), reason,
                          retried=[t.trial_id for t in again])
    if not again:
        return outcome, []
    new = Pack(f"{pack.pack_id}-r{max(restarts[t.trial_id] for t in again)}", pack.base, again)
    return outcome, [(new, PackRetried(new.pack_id, pack.pack_id, [t.trial_id for t in again],
                                       "worker_lost", reason, time.time()))]


def after_oom(pack: Pack, outcome: PackOutcome
              ) -> tuple[PackOutcome, list[tuple[Pack, PackRetried]]]:
    """A pack out of device memory: its interrupted trials go again in two halves.

    A trial that was the only one interrupted goes again alone, once: a trial alone that runs out
    of memory fails, saying what to lower. Trials sent alone lose `inject_oom_at_step`, which
    simulates a pack too big for the device.
    """
    stopped = set(outcome.interrupted)
    trials = [t for t in pack.trials if t.trial_id in stopped]
    final = [r for r in outcome.results if r.trial_id not in stopped]
    if len(pack.trials) == 1:
        final += [failed_result(t.trial_id, f"out of memory with this trial alone on its device: "
                                      f"{oom_advice(t)} ({outcome.error})") for t in trials]
        trials = []
    half = (len(trials) + 1) // 2
    parts = [part for part in (trials[:half], trials[half:]) if part]
    again = []
    for suffix, part in zip("ab", parts, strict=False):
        if len(part) == 1:
            part = [_alone(part[0])]
        new = Pack(f"{pack.pack_id}-{suffix}", pack.base, part)
        again.append((new, PackRetried(new.pack_id, pack.pack_id, [t.trial_id for t in part],
                                       "oom", outcome.error or "out of memory", time.time())))
    outcome = replace(outcome, results=final, retried=[t.trial_id for t in trials])
    return outcome, again


def oom_advice(trial) -> str:
    """What to change when `trial` alone does not fit on its device."""
    advice = "lower train.micro_batch_size, train.seq_len or lora.r"
    switches = [f"train.{key}=true" for key in ("gradient_checkpointing", "activation_offload")
                if not getattr(trial.base, key)]
    return advice + (f", or set {' / '.join(switches)}" if switches else "")


def _alone(trial):
    if trial.spec.inject_oom_at_step is None:
        return trial
    return replace(trial, spec=replace(trial.spec, inject_oom_at_step=None))


def lost_pack(pack: Pack, error: BaseException) -> PackOutcome:
    """Every trial of a pack whose task failed outside the engine is failed with the reason."""
    reason = f"pack lost: {type(error).__name__}: {first_line(error)}"
    return PackOutcome(pack.pack_id, [failed_result(t.trial_id, reason) for t in pack.trials],
                       None, None, time.time(), reason)
