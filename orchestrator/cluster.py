"""Ray: one `PackWorker` per GPU (or CPU slot), each keeping its loaded base between packs.

- `connect(cluster)` starts Ray here (`local`) or joins one (`auto`, `ray://...`), or reuses a Ray
  already initialised in this process (tests, notebooks), and decides how many workers to run.
- `dispatch(packs, plan)` hands packs to workers as they free up and yields, every fraction of a
  second, the events that arrived: streamed metrics, trial ends, and each pack's `PackOutcome`
  (collected with `ray.wait`, so one failed pack never hides the others).

Metrics travel from the workers through one `ray.util.queue.Queue`, flushed in small batches by a
background thread of each worker, so training never waits on the driver. The outcome a pack
returns is authoritative (it carries the adapters); the streamed events are for live progress.

Faults. Workers checkpoint each trial (`checkpoint_dir`, every `checkpoint_every` steps and at its
end), so a trial sent again continues from its last checkpoint, and one whose checkpoint says it
ended returns its result at once, without training.

- A lost worker (`RayActorError`: process killed or crashed, node lost, host OOM kill): the worker
  is replaced and the pack's trials that have no final result go again, as a new pack, up to
  `max_retries` times each (`PackRetried`, cause "worker_lost"); then they fail with the reason.
  A trial whose end (diverged) was streamed before the loss keeps that end.
- CUDA out of memory in a pack (`torch.OutOfMemoryError`): the worker frees memory and reports
  the trials that had not ended; the driver halves the pack and sends both halves again
  (`PackRetried`, cause "oom"). A trial alone that still does not fit fails, saying what to lower.
- Any other exception in the engine fails the trials of the pack that had not ended (a bug or a
  bad input would fail the same way again).

Every pack sent, retries included, ends with exactly one `PackOutcome` holding the results that
are final; the trials it sent again are listed in `PackOutcome.retried`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from ray.util.queue import Empty, Queue

from orchestrator.errors import ConfigError
from orchestrator.planner import Pack
from orchestrator.schema import ClusterCfg
from qlora.config import BaseSpec, TrialSpec

log = logging.getLogger(__name__)
_CODE_ROOT = str(Path(__file__).resolve().parents[1])  # the folder holding orchestrator/, qlora/

#: Every worker trains with one thread: two 2-thread processes on two cores run ~50x slower.
#: Progress bars of model loading would interleave with the driver's own progress display.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
MAX_CPU_WORKERS = 8
FLUSH_INTERVAL_S = 0.5  # how often a worker sends its buffered events to the driver
POLL_INTERVAL_S = 0.25  # how long the driver waits for a pack before draining events again


class ClusterUnavailable(ConfigError):
    """Ray could not be started or reached, or cannot host the requested workers (exit 2)."""


@dataclass
class WorkerPlan:
    """How many workers a sweep runs and what each one asks Ray for."""

    num_workers: int
    gpus_per_worker: float
    address: str
    owns_ray: bool  # connect() called ray.init, so disconnect() shuts it down
    resources: dict[str, float] = field(default_factory=dict)


def connect(cluster: ClusterCfg) -> WorkerPlan:
    """Start, join or reuse Ray and resolve `num_workers` and `gpus_per_worker`.

    A Ray already initialised in this process is reused as it is (and left running afterwards).
    `local` starts Ray on this machine; `auto` and `ray://host:port` join an existing cluster.
    `gpus_per_worker` None means 1 on a cluster with GPUs, else 0. `num_workers` None means one
    worker per `gpus_per_worker` GPUs, or on a CPU-only cluster one per CPU (1 to 8).
    Raises `ClusterUnavailable` (a `ConfigError`) with a one-line reason naming the key at fault.
    """
    owns = False
    if not ray.is_initialized():
        kwargs = dict(logging_level=logging.WARNING, configure_logging=True)
        try:
            if cluster.address == "local":
                # "local", not None: ray.init() alone joins the cluster named in
                # /tmp/ray/ray_current_cluster (another user's, a test's) when there is one.
                ray.init(address="local", include_dashboard=False, **kwargs)
            else:
                ray.init(address=cluster.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterUnavailable(
                "cluster.address", f"cannot start or reach Ray at {cluster.address!r}: "
                f"{_first_line(e)}") from e
        owns = True
    try:
        resources = {k: float(v) for k, v in ray.cluster_resources().items()}
        num_workers, gpus = _resolve_workers(cluster, resources)
    except ClusterUnavailable:
        if owns:
            ray.shutdown()
        raise
    return WorkerPlan(num_workers=num_workers, gpus_per_worker=gpus, address=cluster.address,
                      owns_ray=owns, resources=resources)


def disconnect(plan: WorkerPlan) -> None:
    """Shut Ray down if `connect` started or joined it; leave a Ray it found running alone."""
    if plan.owns_ray and ray.is_initialized():
        ray.shutdown()


def _resolve_workers(cluster: ClusterCfg, resources: dict[str, float]) -> tuple[int, float]:
    total_gpus = resources.get("GPU", 0.0)
    total_cpus = resources.get("CPU", 0.0)
    gpus = cluster.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total_gpus > 0 else 0.0
    if gpus > 0 and total_gpus == 0:
        raise ClusterUnavailable(
            "cluster.gpus_per_worker", f"{gpus} asked, but the Ray cluster has no GPUs (use 0)")
    # Each worker also holds one CPU slot, so CPUs bound the count on GPU clusters too.
    capacity = int(total_cpus)
    if gpus > 0:
        capacity = min(capacity, math.floor(total_gpus / gpus + 1e-9))
    if cluster.num_workers is not None:
        if cluster.num_workers > capacity:
            # An autoscaling cluster may grow to fit; a fixed one leaves the extra workers waiting.
            log.warning("cluster.num_workers=%d exceeds what the cluster holds now (%d): the rest "
                        "wait for resources", cluster.num_workers, capacity)
        return cluster.num_workers, float(gpus)
    if gpus > 0:
        return max(1, capacity), float(gpus)
    return max(1, min(capacity, MAX_CPU_WORKERS)), 0.0


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
    """What the engine reported for one trial at one optimizer step (`on_metrics`)."""

    pack_id: str
    trial_id: str
    step: int
    metrics: dict[str, float]
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


@dataclass
class PackRetried:
    """Trials of `from_pack` sent again as the new pack `pack_id`, each from its last checkpoint."""

    pack_id: str
    from_pack: str
    trial_ids: list[str]
    cause: str  # worker_lost | oom
    reason: str
    time: float


Event = PackStarted | MetricsEvent | TrialEnded | PackOutcome | PackRetried

#: What Ray raises when a worker's process or node is gone (the pack may run again elsewhere).
WORKER_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
               ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
               ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError)


# -- the worker ---------------------------------------------------------------------------------

class _Emitter:
    """Buffers events and ships them to the driver's queue from a background thread."""

    def __init__(self, queue: Queue, interval: float = FLUSH_INTERVAL_S):
        self._queue = queue
        self._interval = interval
        self._buffer: list = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        self._thread = threading.Thread(target=self._loop, name="metrics-emitter", daemon=True)
        self._thread.start()

    def emit(self, event) -> None:
        with self._lock:
            self._buffer.append(event)

    def close(self) -> None:
        """Stop the thread and send what is left, so it reaches the queue before the outcome."""
        self._stop.set()
        self._thread.join()
        self._flush()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            items, self._buffer = self._buffer, []
        if not items:
            return
        try:
            self._queue.put_nowait_batch(items)
        except Exception as e:  # live progress is best effort; the outcome still carries results
            if not self._warned:
                log.warning("dropping streamed metrics: %s", _first_line(e))
                self._warned = True


@ray.remote
class PackWorker:
    """Trains packs one after another on one device, keeping the loaded base between them."""

    def __init__(self, index: int, queue: Queue):
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        self._index = index
        self._queue = queue
        self._base = None
        self._loads = 0  # bases loaded so far (backfill and reuse keep this low)

    def placement(self) -> Placement:
        """Where this worker runs and which devices Ray gave it."""
        return Placement(
            worker=self._index,
            node_id=ray.get_runtime_context().get_node_id(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            gpu_ids=[str(g) for g in ray.get_gpu_ids()],
        )

    def run_pack(self, pack_id: str, base_spec: BaseSpec, specs: list[TrialSpec],
                 checkpoint_dir: str | None = None, checkpoint_every: int = 0,
                 coordinator=None) -> PackOutcome:
        """Train `specs` together, each from its checkpoint under `checkpoint_dir` if it has one.

        An engine exception fails the trials that had not ended; out of device memory instead
        marks the outcome `oom`, with those trials `interrupted`, for the driver to split.
        With a `SearchCoordinator` (orchestrator.coordinator), trials may be stopped early and
        freed slots are backfilled with waiting trials; their results are in the outcome too.
        """
        import torch

        from orchestrator.coordinator import WorkerHooks
        from qlora import train_pack

        placement = self.placement()
        started = time.time()
        emitter = _Emitter(self._queue)
        emitter.emit(PackStarted(pack_id, placement, started))
        ended: dict[str, object] = {}
        hooks = (WorkerHooks(coordinator, pack_id, base_spec, specs)
                 if coordinator is not None else None)
        loads = self._loads

        def on_metrics(trial_id: str, step: int, metrics: dict) -> bool:
            emitter.emit(MetricsEvent(pack_id, trial_id, step, dict(metrics), time.time()))
            return hooks is not None and hooks.on_metrics(trial_id, step, metrics)

        def on_trial_end(result) -> None:
            ended[result.trial_id] = result
            emitter.emit(TrialEnded(pack_id, result.trial_id, result.status, result.steps,
                                    result.eval_loss, result.reason, time.time()))
            if hooks is not None:
                hooks.on_trial_end(result.trial_id)

        error, oom, base = None, False, None
        try:
            base = self._base_for(base_spec)
            train_pack(base, specs, on_metrics=on_metrics, on_trial_end=on_trial_end,
                       next_trial=hooks.next_trial if hooks is not None else None,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
        except torch.OutOfMemoryError as e:
            # Splitting helps only if the base itself fitted; the frozen base is still sound.
            oom = base is not None
            error = f"{type(e).__name__}: {_first_line(e)}"
        except Exception as e:
            error = f"{type(e).__name__}: {_first_line(e)}"
            self._drop_base()  # its state after a failed step is not worth trusting
        finally:
            emitter.close()
        if oom:
            self._free_memory()  # the failed step's tensors, now that the traceback is gone
        if hooks is not None:
            specs = [*specs, *hooks.backfilled]
        interrupted = [s.trial_id for s in specs if s.trial_id not in ended] if error else []
        results = [ended.get(s.trial_id) or _failed(s.trial_id, f"pack failed: {error}")
                   for s in specs]
        return PackOutcome(pack_id, results, placement, started, time.time(), error, oom=oom,
                           interrupted=interrupted, base_loads=self._loads - loads)

    def _base_for(self, spec: BaseSpec):
        # Memory options (gradient checkpointing, offload) are applied at load time, so a base is
        # reused only for an equal spec; the planner keeps such trials in separate packs anyway.
        if self._base is None or self._base.spec != spec:
            from qlora import load_base

            self._drop_base()
            self._base = load_base(spec)
            self._loads += 1
        return self._base

    def _drop_base(self) -> None:
        self._base = None
        self._free_memory()

    @staticmethod
    def _free_memory() -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _failed(trial_id: str, reason: str):
    return _result(trial_id, "failed", 0, None, reason)


def _result(trial_id: str, status: str, steps: int, eval_loss: float | None, reason: str | None):
    from qlora import TrialResult

    return TrialResult(trial_id=trial_id, status=status, steps=steps, eval_loss=eval_loss,
                       reason=reason)


# -- the driver's loop --------------------------------------------------------------------------

def dispatch(packs: list[Pack], plan: WorkerPlan, poll_s: float = POLL_INTERVAL_S, *,
             checkpoint_dir: str | None = None, checkpoint_every: int = 0,
             max_retries: int = 0, coordinator=None,
             refill: Callable[[], list[Pack]] | None = None) -> Iterator[list[Event]]:
    """Run `packs` on up to `plan.num_workers` workers; yield the events of each poll interval.

    Packs start in the order given as workers free up; packs sent again after a fault go first.
    Each yielded list holds the streamed events that arrived (possibly none), then for every pack
    that ended its `PackOutcome` and any `PackRetried` it caused; a pack's streamed events always
    come before its outcome. Trials checkpoint under `checkpoint_dir` (see the module's Faults).
    Workers and the queue are torn down when the generator finishes or is closed.

    A search (orchestrator.search_run) may pass a `coordinator` actor, handed to every pack
    (early stopping and backfill), and `refill`, asked for more packs whenever a worker is idle
    and none is waiting (Optuna's next round); the loop ends when neither has anything left.
    """
    if not packs:
        return
    queue = Queue(actor_options={"num_cpus": 0})
    workers = [_new_worker(plan, i, queue) for i in range(min(plan.num_workers, len(packs)))]
    idle = deque(range(len(workers)))
    todo = deque(packs)
    running: dict[ray.ObjectRef, tuple[int, Pack]] = {}
    streamed: dict[str, TrialEnded] = {}  # the last streamed end of each trial
    restarts: dict[str, int] = {}  # trial_id -> times sent again after a lost worker
    try:
        while True:
            if refill is not None and idle and not todo:
                todo.extend(refill())
            if not (todo or running):
                break
            while todo and idle:
                slot, pack = idle.popleft(), todo.popleft()
                ref = workers[slot].run_pack.remote(pack.pack_id, pack.base,
                                                    [t.spec for t in pack.trials],
                                                    checkpoint_dir, checkpoint_every, coordinator)
                running[ref] = (slot, pack)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            if ready:
                ready, _ = ray.wait(list(running), num_returns=len(running), timeout=0)
            # Drain after waiting: whatever a finished pack streamed is already in the queue.
            events: list[Event] = _drain(queue)
            streamed.update((ev.trial_id, ev) for ev in events if isinstance(ev, TrialEnded))
            for ref in ready:
                slot, pack = running.pop(ref)
                again: list[tuple[Pack, PackRetried]] = []
                try:
                    outcome = ray.get(ref)
                except WORKER_LOST as e:
                    with contextlib.suppress(Exception):
                        ray.kill(workers[slot])
                    workers[slot] = _new_worker(plan, slot, queue)
                    outcome, again = after_lost_worker(pack, e, streamed, restarts, max_retries)
                except Exception as e:
                    outcome = _lost_pack(pack, e)
                else:
                    if outcome.oom:
                        outcome, again = after_oom(pack, outcome)
                events.append(outcome)
                events.extend(retried for _, retried in again)
                todo.extendleft(reversed([p for p, _ in again]))
                idle.append(slot)
            yield events
    finally:
        # Best effort: after Ctrl-C or a lost Ray, a failing teardown must not mask the cause.
        for worker in workers:
            with contextlib.suppress(Exception):
                ray.kill(worker)
        with contextlib.suppress(Exception):
            queue.shutdown(force=True)


def after_lost_worker(pack: Pack, error: BaseException, streamed: dict[str, TrialEnded],
                      restarts: dict[str, int], max_retries: int
                      ) -> tuple[PackOutcome, list[tuple[Pack, PackRetried]]]:
    """The outcome of a pack whose worker was lost, and the pack that sends its trials again.

    A trial whose failure (diverged) was streamed keeps it. Every other trial goes again while it
    has restarts left (`restarts` is updated); a finished one's checkpoint returns it at once.
    """
    reason = f"worker lost: {type(error).__name__}: {_first_line(error)}"
    final, again = [], []
    for trial in pack.trials:
        tid = trial.trial_id
        end = streamed.get(tid)
        if end is not None and end.status not in ("finished", "stopped"):
            final.append(_result(tid, end.status, end.steps, end.eval_loss, end.reason))
        elif restarts.get(tid, 0) < max_retries:
            restarts[tid] = restarts.get(tid, 0) + 1
            again.append(trial)
        else:
            tries = restarts.get(tid, 0)
            final.append(_failed(tid, f"{reason} (after {tries} restart{'s' * (tries != 1)}; "
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
        final += [_failed(t.trial_id, f"out of memory with this trial alone on its device: "
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


def _new_worker(plan: WorkerPlan, index: int, queue: Queue):
    return PackWorker.options(
        num_cpus=1,
        num_gpus=plan.gpus_per_worker,
        runtime_env={"env_vars": _worker_env(plan)},
    ).remote(index, queue)


def _worker_env(plan: WorkerPlan) -> dict[str, str]:
    env = dict(WORKER_ENV)
    if not plan.address.startswith("ray://"):
        # Ray puts only the driver's cwd on workers' paths; run from elsewhere, a checkout that is
        # not pip-installed would not import. Nodes share the layout (Ray's own assumption);
        # Ray expands ${PYTHONPATH} to the node's value.
        env["PYTHONPATH"] = f"{_CODE_ROOT}{os.pathsep}${{PYTHONPATH}}"
    return env


def _drain(queue: Queue) -> list:
    """Streamed events waiting in the queue. Live progress is best effort: if the queue's actor is
    lost (seen once on a heavily loaded 2-core machine: it died before it started), the sweep goes
    on and every trial's full history still arrives with its pack's outcome."""
    try:
        # One consumer, so what qsize() reports is there to take.
        n = queue.qsize()
        return queue.get_nowait_batch(n) if n else []
    except Empty:
        return []
    except ray.exceptions.RayError as e:
        if not getattr(_drain, "warned", False):
            log.warning("live metrics lost (%s); results still arrive when each pack ends",
                        _first_line(e))
            _drain.warned = True
        return []


def _lost_pack(pack: Pack, error: BaseException) -> PackOutcome:
    """Every trial of a pack whose task failed outside the engine is failed with the reason."""
    reason = f"pack lost: {type(error).__name__}: {_first_line(error)}"
    return PackOutcome(pack.pack_id, [_failed(t.trial_id, reason) for t in pack.trials],
                       None, None, time.time(), reason)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
