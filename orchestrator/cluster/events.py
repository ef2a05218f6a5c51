"""What flows from the workers back to the driver, and the results the driver makes itself.

Metrics travel from the workers through one `ray.util.queue.Queue`, flushed in small batches by a
background thread of each worker, so training never waits on the driver. The outcome a pack
returns (`PackOutcome`) is authoritative (it carries the adapters); the streamed events are for
live progress. Every pack sent, retries included, ends with exactly one `PackOutcome` holding the
results that are final; the trials it sent again are listed in `PackOutcome.retried`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray

from qlora.config import TrialStatus

# -- what flows back to the driver --------------------------------------------------------------

@dataclass
class Placement:
    """Where a worker runs: enough to check that each worker sees only its own device."""

    worker: int
    node_id: str
    hostname: str
    pid: int
    cuda_visible_devices: str | None
    gpu_ids: list


@dataclass
class PackStarted:
    """A worker took a pack (sent before the base is loaded)."""

    pack_id: str
    placement: Placement
    time: float


@dataclass
class MetricsEvent:
    """What the engine reported for one trial at one optimizer step (`on_metrics`): floats, and
    at an evaluation also `samples` (`qlora.metrics.SAMPLES`), its generated answers."""

    pack_id: str
    trial_id: str
    step: int
    metrics: dict  # name -> float; `samples` -> list of dicts
    time: float


@dataclass
class TrialEnded:
    """A trial's end as streamed (no adapter); the pack's `PackOutcome` follows with it."""

    pack_id: str
    trial_id: str
    status: str
    steps: int
    eval_loss: float | None
    reason: str | None
    time: float


@dataclass
class PackOutcome:
    """One TrialResult per trial of the pack (adapters included) and where and when it ran."""

    pack_id: str
    results: list  # list[qlora.TrialResult]
    placement: Placement | None
    started: float | None
    ended: float
    error: str | None = None  # set when the pack did not run to its end
    oom: bool = False  # the pack ran out of device memory (its interrupted trials are retried)
    interrupted: list[str] = field(default_factory=list)  # trials that had not ended when it stopped
    retried: list[str] = field(default_factory=list)  # trials sent again in a new pack
    base_loads: int = 0  # times the worker loaded a base for this pack (0: it kept the last one)
    memory_estimate: int | None = None  # qlora.estimate_memory's bytes for the pack
    memory_peak: int | None = None  # measured: CUDA max allocated, or CPU RSS high-water above
    #                                  the worker's RSS before its first base (see PackWorker)
    bits_per_weight: float | None = None  # measured storage of the base's linears (quant.type)
    storage_lost: bool = False  # its checkpoint storage failed for the patience: the sweep stops


@dataclass
class PackRetried:
    """Trials of `from_pack` sent again as the new pack `pack_id`, each from its last checkpoint."""

    pack_id: str
    from_pack: str
    trial_ids: list[str]
    cause: str  # worker_lost | oom
    reason: str
    time: float


@dataclass
class WorkersWaiting:
    """Workers Ray has not placed yet (no node has room, or none is left), reported by the driver
    while packs wait for them: `waiting` of `total` workers, each asking `asks`, since `since`."""

    waiting: int
    total: int
    asks: str  # what one worker asks Ray for, e.g. "1 CPU, 1 GPU"
    since: float
    cluster: dict  # the cluster's resources when the sweep began
    time: float


Event = PackStarted | MetricsEvent | TrialEnded | PackOutcome | PackRetried | WorkersWaiting

#: What Ray raises when a worker's process or node is gone (the pack may run again elsewhere).
WORKER_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
               ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
               ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError)


def failed_result(trial_id: str, reason: str):
    return trial_result(trial_id, TrialStatus.FAILED, 0, None, reason)


def trial_result(trial_id: str, status: str, steps: int, eval_loss: float | None, reason: str | None):
    from qlora import TrialResult

    return TrialResult(trial_id=trial_id, status=status, steps=steps, eval_loss=eval_loss,
                       reason=reason)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
