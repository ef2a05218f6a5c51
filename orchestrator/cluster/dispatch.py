"""`dispatch(packs, plan)`: hand packs to workers as they free up, yield what comes back.

Every fraction of a second it yields the events that arrived: streamed metrics, trial ends, and
each pack's `PackOutcome` (collected with `ray.wait`, so one failed pack never hides the others).
A lost worker is replaced and a pack out of memory split (`orchestrator.cluster.faults`); the
packs sent again go first, to whichever worker is free.

Workers and the cluster. A worker is sent packs only once Ray has placed it and it answered
(`PackWorker.placement`); a replacement that no node can host yet (its node died, the cluster
is smaller than asked, an autoscaler is still growing) holds no work, and the console is told
what it waits for and since when (`WorkersWaiting`). When no worker at all is placed while
packs wait, for `lost_timeout_s`, the cluster is taken as gone: `SweepLost` (exit 3). A
running pack that reports nothing for `hang_timeout_s` (once its worker said it started it; before
that, `START_GRACE_S` at least: a new worker's imports come first) has its worker killed and its trials sent
again (`WorkerHung`); from then on, and after any loss, what that pack still streams is dropped:
only the attempt now running a trial is recorded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ray
from ray.util.queue import Empty, Queue

from orchestrator.cluster.connect import WorkerPlan, worker_env
from orchestrator.cluster.events import (
    WORKER_LOST,
    Event,
    PackRetried,
    PackStarted,
    TrialEnded,
    WorkersWaiting,
    first_line,
)
from orchestrator.cluster.faults import WorkerHung, after_lost_worker, after_oom, lost_pack
from orchestrator.cluster.lost import SweepLost
from orchestrator.cluster.pack import Pack
from orchestrator.cluster.worker import PackWorker

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25  # how long the driver waits for a pack before draining events again
WAIT_NOTICE_S = 20.0  # a worker unplaced this long (or lost_timeout_s / 2) is reported, then
#                       every WAIT_REPEAT_S
WAIT_REPEAT_S = 60.0
LOST_TIMEOUT_S = 120.0
START_GRACE_S = 300.0  # a pack sent to a worker still importing may take this long to start
TEARDOWN_WAIT_S = 3.0  # how long the end of a sweep waits for its workers to be killed


@dataclass
class Prestarted:
    """The stream's queue and workers created before the packs were known (`prestart`)."""

    queue: Queue
    slots: list

    def release(self) -> None:
        """Kill what no `dispatch` took (a sweep that stopped before it dispatched)."""
        _kill([s.worker for s in self.slots] + [self.queue.actor], wait_s=TEARDOWN_WAIT_S)
        self.slots = []


def prestart(plan: WorkerPlan, workers: int) -> Prestarted:
    """The queue and min(`workers`, plan.num_workers) workers, asked of Ray now: each imports
    the engine (`PackWorker.warm`) while the driver opens its tracking store and plans."""
    queue = _driver_queue(plan)
    return Prestarted(queue, [_new_slot(plan, i, queue)
                              for i in range(min(workers, plan.num_workers))])


@dataclass
class _Slot:
    """One of the sweep's workers: its actor, and while Ray has not placed it, since when."""

    worker: object
    placing: ray.ObjectRef | None  # its placement() call, until it answers
    since: float  # wall time this actor was asked for


# -- the driver's loop --------------------------------------------------------------------------

def dispatch(packs: list[Pack], plan: WorkerPlan, poll_s: float = POLL_INTERVAL_S, *,
             checkpoint_dir: str | None = None, checkpoint_every: int = 0,
             max_retries: int = 0, hooks=None, data=None,
             refill: Callable[[], list[Pack]] | None = None,
             lost_timeout_s: float = LOST_TIMEOUT_S,
             hang_timeout_s: float | None = None) -> Iterator[list[Event]]:
    """Run `packs` on up to `plan.num_workers` workers; yield the events of each poll interval.

    Packs start in the order given as placed workers free up; packs sent again after a fault go
    first. Each yielded list holds the streamed events that arrived (possibly none), then for
    every pack that ended its `PackOutcome` and any `PackRetried` it caused; a pack's streamed
    events always come before its outcome. Trials checkpoint under `checkpoint_dir` (see the
    module's Faults). Workers and the queue are torn down when the generator finishes or is
    closed. Raises `SweepLost` when packs wait and no worker is placed for `lost_timeout_s`.

    A search (orchestrator.search_run) may pass `hooks`, handed to every pack (its
    `for_pack(pack_id, base, specs)` gives the engine's callbacks: early stopping, exploit,
    backfill), and `refill`, asked for more packs whenever a worker is idle
    and none is waiting (Optuna's next round); the loop ends when neither has anything left.
    `data` (orchestrator.cluster.datashare.DataShare) names the tokenized data workers open.
    """
    if not packs:
        return
    pre, plan.prestarted = plan.prestarted, None
    queue = pre.queue if pre is not None else _driver_queue(plan)
    wanted = min(plan.num_workers, len(packs))
    slots = list(pre.slots[:wanted]) if pre is not None else []
    if pre is not None:
        _kill([s.worker for s in pre.slots[wanted:]], wait_s=0)  # more than the packs need
    slots += [_new_slot(plan, i, queue) for i in range(len(slots), wanted)]
    idle: deque[int] = deque()  # placed workers with nothing to do
    todo = deque(packs)
    running: dict[ray.ObjectRef, tuple[int, Pack]] = {}
    streamed: dict[str, TrialEnded] = {}  # the last streamed end of each trial
    restarts: dict[str, int] = {}  # trial_id -> times sent again after a lost worker
    stalled_since: float | None = None  # since when packs wait and no worker is placed
    noticed = (0.0, 0)  # when waiting workers were last reported, and how many
    start_error = ""  # why the last worker that died before it was placed died
    heard: dict[str, float] = {}  # running pack id -> when it last reported (or was sent)
    began: set[str] = set()  # packs whose worker said it started them (PackStarted)
    try:
        while True:
            if refill is not None and idle and not todo:
                todo.extend(refill())
            if not (todo or running):
                break
            while todo and idle:
                slot, pack = idle.popleft(), todo.popleft()
                ref = slots[slot].worker.run_pack.remote(
                    pack.pack_id, pack.base, [t.spec for t in pack.trials], checkpoint_dir,
                    checkpoint_every, hooks, data, lost_timeout_s)
                running[ref] = (slot, pack)
                heard[pack.pack_id] = time.time()
            placing = {s.placing: i for i, s in enumerate(slots) if s.placing is not None}
            ready, _ = ray.wait([*running, *placing], num_returns=1, timeout=poll_s)
            if ready:
                ready, _ = ray.wait([*running, *placing],
                                    num_returns=len(running) + len(placing), timeout=0)
            # Drain after waiting: whatever a finished pack streamed is already in the queue.
            # What a pack no longer running streams (its worker was taken for lost) is dropped.
            events: list[Event] = [ev for ev in _drain(queue)
                                   if getattr(ev, "pack_id", None) in heard or
                                   not hasattr(ev, "pack_id")]
            now = time.time()
            heard.update((ev.pack_id, now) for ev in events if hasattr(ev, "pack_id"))
            began.update(ev.pack_id for ev in events if isinstance(ev, PackStarted))
            if hang_timeout_s is not None:
                hung = [ref for ref, (_, p) in running.items() if ref not in ready and
                        now - heard[p.pack_id] >= (hang_timeout_s if p.pack_id in began else
                                                   max(hang_timeout_s, START_GRACE_S))]
                for ref in hung:
                    slot, pack = running.pop(ref)
                    silent = now - heard.pop(pack.pack_id)
                    _replace(slots, slot, plan, queue)  # kills it (ray.kill) and asks for another
                    error = WorkerHung(f"{pack.pack_id} reported nothing for {silent:.0f} s "
                                       "(cluster.hang_timeout_s)")
                    outcome, again = after_lost_worker(pack, error, streamed, restarts,
                                                       max_retries)
                    events.extend([outcome, *(retried for _, retried in again)])
                    todo.extendleft(reversed([p for p, _ in again]))
            streamed.update((ev.trial_id, ev) for ev in events if isinstance(ev, TrialEnded))
            for ref in ready:
                if ref not in running and ref not in placing:  # taken for hung just now
                    continue
                if ref in placing:
                    i = placing[ref]
                    try:
                        ray.get(ref)
                    except Exception as e:  # it died before it was placed: ask for another
                        start_error = f"{type(e).__name__}: {first_line(e)}"
                        log.info("worker %d not started (%s); asking again", i, start_error)
                        _replace(slots, i, plan, queue)
                    else:
                        slots[i].placing = None
                        idle.append(i)
                    continue
                slot, pack = running.pop(ref)
                heard.pop(pack.pack_id, None)
                again: list[tuple[Pack, PackRetried]] = []
                try:
                    outcome = ray.get(ref)
                except WORKER_LOST as e:
                    # Its slot waits for a replacement; its trials go to whichever worker is free.
                    _replace(slots, slot, plan, queue)
                    outcome, again = after_lost_worker(pack, e, streamed, restarts, max_retries)
                    slot = None
                except Exception as e:
                    outcome = lost_pack(pack, e)
                else:
                    if outcome.storage_lost:  # resumable: the trials keep their checkpoints
                        raise SweepLost("cluster.storage", outcome.error)
                    if outcome.oom:
                        outcome, again = after_oom(pack, outcome)
                events.append(outcome)
                events.extend(retried for _, retried in again)
                todo.extendleft(reversed([p for p, _ in again]))
                if slot is not None:
                    idle.append(slot)
            now = time.time()
            waiting = [s for s in slots if s.placing is not None]
            if waiting and (todo or not (running or idle)):
                since = min(s.since for s in waiting)
                notice = min(WAIT_NOTICE_S, lost_timeout_s / 2)
                changed = len(waiting) != noticed[1]
                if now - since >= notice and (changed or now - noticed[0] >= WAIT_REPEAT_S):
                    noticed = (now, len(waiting))
                    events.append(WorkersWaiting(len(waiting), len(slots), _asks(plan), since,
                                                 dict(plan.resources), now))
            if todo and not (running or idle):
                stalled_since = stalled_since or now
                if now - stalled_since >= lost_timeout_s:
                    raise SweepLost("cluster.lost_timeout_s", (
                        f"no node could host a worker for {lost_timeout_s:g} s (each asks "
                        f"{_asks(plan)}; {sum(len(p.trials) for p in todo)} trial(s) waiting): "
                        "the cluster is gone or too small"
                        + (f"; the last worker to start died: {start_error}" if start_error
                           else "")))
            else:
                stalled_since = None
            yield events
    finally:
        # Best effort: after Ctrl-C or a lost Ray, a failing teardown must not mask the cause,
        # and a head that stopped answering must not hold the driver (ray.kill asks the GCS).
        _kill([s.worker for s in slots] + [queue.actor], wait_s=TEARDOWN_WAIT_S)


def _driver_queue(plan: WorkerPlan) -> Queue:
    """The stream's queue, on the driver's own node, so that losing another node does not lose
    the live metrics of the rest of the sweep. Hard affinity: Ray's soft one was seen to place
    it elsewhere 5 times in 6; and where that node is gone, so is this driver. Through Ray Client
    (ray://) the driver has no node here: Ray places it."""
    if plan.address.startswith("ray://"):
        return Queue(actor_options={"num_cpus": 0})
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _asks(plan: WorkerPlan) -> str:
    gpus = f", {plan.gpus_per_worker:g} GPU" if plan.gpus_per_worker else ""
    return f"1 CPU{gpus}"


def _new_slot(plan: WorkerPlan, index: int, queue: Queue) -> _Slot:
    worker = PackWorker.options(
        num_cpus=1,
        num_gpus=plan.gpus_per_worker,
        runtime_env={"env_vars": worker_env(plan)},
    ).remote(index, queue)
    placing = worker.placement.remote()  # answers once the process runs: the cheap __init__
    worker.warm.remote()  # then the imports, ahead of the first pack
    return _Slot(worker, placing, time.time())


def _replace(slots: list[_Slot], index: int, plan: WorkerPlan, queue: Queue) -> None:
    _kill([slots[index].worker], wait_s=0)
    slots[index] = _new_slot(plan, index, queue)


def _kill(actors: list, wait_s: float) -> None:
    """`ray.kill` each actor from a thread of its own, waiting up to `wait_s` for them: with the
    head gone, ray.kill blocks until Ray gives up on the GCS (minutes)."""
    def kill() -> None:
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)

    thread = threading.Thread(target=kill, name="kill-workers", daemon=True)
    thread.start()
    thread.join(wait_s)


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
                        first_line(e))
            _drain.warned = True
        return []
