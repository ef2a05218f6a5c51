"""`dispatch(packs, plan)`: hand packs to workers as they free up, yield what comes back.

Every fraction of a second it yields the events that arrived: streamed metrics, trial ends, and
each pack's `PackOutcome` (collected with `ray.wait`, so one failed pack never hides the others).
A lost worker is replaced and a pack out of memory split (`orchestrator.cluster.faults`); the
packs sent again go first.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator

import ray
from ray.util.queue import Empty, Queue

from orchestrator.cluster.connect import WorkerPlan, worker_env
from orchestrator.cluster.events import WORKER_LOST, Event, PackRetried, TrialEnded, first_line
from orchestrator.cluster.faults import after_lost_worker, after_oom, lost_pack
from orchestrator.cluster.worker import PackWorker
from orchestrator.planner import Pack

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.25  # how long the driver waits for a pack before draining events again


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

    A search (orchestrator.search.run) may pass a `coordinator` actor, handed to every pack
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
                    outcome = lost_pack(pack, e)
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


def _new_worker(plan: WorkerPlan, index: int, queue: Queue):
    return PackWorker.options(
        num_cpus=1,
        num_gpus=plan.gpus_per_worker,
        runtime_env={"env_vars": worker_env(plan)},
    ).remote(index, queue)


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
