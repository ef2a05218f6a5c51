"""`SearchCoordinator`: a small Ray actor that holds a live scheduler while packs train.

The driver creates it (for a scheduler that is `live`: ASHA, PBT) and hands it to every
`PackWorker`. It speaks only the `Scheduler` protocol (`orchestrator.search.protocols`). A worker
talks to it through `WorkerHooks`, plugged into the engine's callbacks:

- `on_metrics` at an evaluation: `report(trial, step, metrics)` (the sweep's objective in them),
  answered at once with stop or go on. Between evaluations a worker asks, without waiting, for
  the trials that later results have ruled out (`pending`), and stops them at their next step.
- `exploit` after a pack's round of evaluations: `round(reports)`, answered with the trials that
  take another's state (PBT), which the engine copies in memory (`qlora.exploit`).
- `next_trial` when a trial of the pack ended: the next waiting trial that can share the pack's
  base (same base and sequence length), so the freed adapter slot is filled without loading the
  base again (backfill).

The driver fills the queue (`add_waiting`) and reads the decisions (`stops`) to tag the runs.
Trials backfilled into a pack whose worker was lost are put back in the queue (`orphans`): they
continue from their checkpoints in whichever pack takes them next.

Losing it (its process or its node) loses nothing: Ray restarts it (`max_restarts`, calls in
flight retried), and the new one holds every worker's call (`HOLD_S` at most) until the driver
has given it back the sweep's state as the driver saw it (`restore`: the trials, those still
waiting, those backfilled into each pack, every evaluation and every end in the order they came).
"""

from __future__ import annotations

import threading
import uuid
from collections import deque

from orchestrator.search.asha import Asha, AshaScheduler
from orchestrator.search.objective import Objective
from orchestrator.search.protocols import EXPLOIT, STOP, Report, Scheduler
from orchestrator.search.schedulers import Fifo
from orchestrator.search.trials import pack_key
from qlora.config import BaseSpec, TrialSpec
from qlora.exploit import Exploit

HOLD_S = 120.0  # how long a restarted coordinator makes a worker wait for the driver's restore


def _locked(method):
    """One call at a time (the actor runs calls in threads, so that a held call does not block
    the driver's `restore`); `hold` ones first wait for a restarted actor's restore."""
    def call(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def _held(method):
    locked = _locked(method)

    def call(self, *args, **kwargs):
        self._restored.wait(HOLD_S)
        return locked(self, *args, **kwargs)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


class SearchCoordinator:
    """A scheduler and the queue of trials waiting for a slot (used as a Ray actor)."""

    def __init__(self, scheduler: Scheduler | Asha | None, objective: Objective | None = None):
        if isinstance(scheduler, Asha):  # a bare rung table (as tests build one)
            scheduler = AshaScheduler.of(scheduler)
        self._scheduler = scheduler if scheduler is not None else Fifo()
        self._objective = objective or Objective()
        self._waiting: dict[str, deque[TrialSpec]] = {}  # group -> specs in the order to run
        self._handed: dict[str, list[TrialSpec]] = {}  # pack id -> trials backfilled into it
        self._group_of: dict[str, str] = {}  # trial -> its group, for one handed out
        self._requeued: dict[str, int] = {}
        self._incarnation = uuid.uuid4().hex
        self._lock = threading.RLock()  # an actor of several threads: one call at a time in here
        self._restored = threading.Event()  # a restarted one waits for the driver's `restore`
        if not _restarted():
            self._restored.set()

    # -- after a restart -----------------------------------------------------------------------

    def incarnation(self) -> tuple[str, bool]:
        """Which life of the actor this is (a new id after each restart), and whether it holds
        the sweep's state (False: restarted, waiting for the driver's `restore`)."""
        return self._incarnation, self._restored.is_set()

    @_locked
    def restore(self, trials: list[tuple[str, int]], waiting: dict[str, list[TrialSpec]],
                handed: dict[str, list[tuple[str, TrialSpec]]], journal: list[tuple]) -> None:
        """The sweep's state, from the driver: the trials, those waiting per group, those
        backfilled into each pack (group, spec), and the journal of evaluations
        ("report", trial, step, metrics) and ends ("end", trial) in the order they came."""
        self.add_trials(trials)
        for group, specs in waiting.items():
            self.add_waiting(group, specs)
        for pack_id, items in handed.items():
            for group, spec in items:
                self._handed.setdefault(pack_id, []).append(spec)
                self._group_of[spec.trial_id] = group
        for entry in journal:
            if entry[0] == "report":
                self._report(*entry[1:])
                self._scheduler.pending()  # as the workers ask between their evaluations
            else:
                self._scheduler.on_trial_complete(entry[1])
        self._restored.set()

    # -- from the driver ------------------------------------------------------------------------

    @_locked
    def add_trials(self, items: list[tuple[str, int]]) -> None:
        """Make trials known to the scheduler: (trial_id, max_steps) of every trial to run."""
        for trial_id, max_steps in items:
            self._scheduler.add_trial(trial_id, max_steps)

    @_locked
    def add_waiting(self, group: str, specs: list[TrialSpec], front: bool = False) -> None:
        """Queue trials for backfill into packs of `group`."""
        queue = self._waiting.setdefault(group, deque())
        if front:
            queue.extendleft(reversed(specs))
        else:
            queue.extend(specs)

    @_locked
    def take(self, group: str, n: int) -> list[TrialSpec]:
        """Up to `n` waiting trials of `group`, out of the queue (for a new pack)."""
        queue = self._waiting.get(group, deque())
        return [queue.popleft() for _ in range(min(n, len(queue)))]

    @_locked
    def waiting(self) -> dict[str, int]:
        """How many trials wait, per group."""
        return {g: len(q) for g, q in self._waiting.items() if q}

    @_locked
    def stops(self) -> dict:
        """Every trial the scheduler stopped, with its rung and reason (`asha.Stop`)."""
        return self._scheduler.stops()

    @_locked
    def orphans(self, pack_id: str, ended: list[str], max_requeues: int) -> tuple[list, list]:
        """Trials backfilled into the lost pack `pack_id` that the driver has no result for
        (`ended` lists those it has): queued again at the front while they have requeues left.
        They continue from their checkpoints; one whose checkpoint says it ended returns its
        result at once.

        Returns (requeued trial ids, given-up trial ids).
        """
        requeued, given_up = [], []
        for spec in self._handed.pop(pack_id, []):
            tid = spec.trial_id
            if tid in ended:
                continue
            if self._requeued.get(tid, 0) >= max_requeues:
                given_up.append(tid)
                continue
            self._requeued[tid] = self._requeued.get(tid, 0) + 1
            self.add_waiting(self._group_of[tid], [spec], front=True)
            requeued.append(tid)
        return requeued, given_up

    # -- from the workers -----------------------------------------------------------------------

    @_held
    def report(self, trial_id: str, step: int, metrics: dict) -> bool:
        """An evaluation of `trial_id` at `step` (its metrics): True if the trial must stop now."""
        return self._report(trial_id, step, metrics)

    def _report(self, trial_id: str, step: int, metrics: dict) -> bool:
        loss = self._objective.loss(self._objective.value(metrics))
        return self._scheduler.on_trial_result(trial_id, step, loss).action == STOP

    @_held
    def round(self, evaluated: list[tuple]) -> dict[str, Exploit]:
        """A pack's round of evaluations, [(trial_id, step, metrics, values, form, max_steps)]:
        the trials that take another's state, as the engine's `Exploit`s."""
        reports = [Report(tid, step, self._objective.loss(self._objective.value(metrics)),
                          values, max_steps, form)
                   for tid, step, metrics, values, form, max_steps in evaluated]
        return {tid: Exploit(d.source, d.values, d.reason)
                for tid, d in self._scheduler.on_pack_results(reports).items()
                if d.action == EXPLOIT}

    @_locked
    def pending_stops(self) -> list[str]:
        """Trials that must stop (ruled out at a rung, possibly after they passed it)."""
        if not self._restored.is_set():
            return []
        return self._scheduler.pending()

    @_held
    def next_trial(self, pack_id: str, group: str) -> TrialSpec | None:
        """The next waiting trial for a freed slot in `pack_id` (of `group`), or None."""
        queue = self._waiting.get(group)
        if not queue:
            return None
        spec = queue.popleft()
        self._handed.setdefault(pack_id, []).append(spec)
        self._group_of[spec.trial_id] = group
        return spec

    @_held
    def ended(self, trial_id: str) -> None:
        """A trial ended in a worker (whatever its status)."""
        self._scheduler.on_trial_complete(trial_id)


def _restarted() -> bool:
    """True in an actor Ray restarted after its process or node was lost."""
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in an actor (tests build the coordinator directly)
        return False


class WorkerHooks:
    """The engine's `on_metrics` and `next_trial` for one pack, backed by the coordinator."""

    def __init__(self, coordinator, pack_id: str, base: BaseSpec, specs: list[TrialSpec]):
        self._coordinator = coordinator
        self._pack_id = pack_id
        self._group = pack_key(base, specs[0].data.seq_len) if specs else ""
        self._asked = None  # an ObjectRef of pending_stops() in flight
        self._stops: set[str] = set()
        self._max_steps = {s.trial_id: s.max_steps for s in specs}
        self.backfilled: list[TrialSpec] = []

    def on_metrics(self, trial_id: str, step: int, metrics: dict) -> bool:
        """True to stop `trial_id` now."""
        import ray

        if "eval_loss" in metrics:  # an evaluation: the numbers, not the generated samples
            numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            return ray.get(self._coordinator.report.remote(trial_id, step, numbers))
        # Between evaluations: never wait; act on the last answer and ask again.
        if self._asked is None:
            self._asked = self._coordinator.pending_stops.remote()
        ready, _ = ray.wait([self._asked], timeout=0)
        if ready:
            self._stops = set(ray.get(self._asked))
            self._asked = None
        return trial_id in self._stops

    def exploit(self, evaluated: list[tuple]) -> dict[str, Exploit]:
        """The engine's `exploit`: this pack's round [(trial_id, step, metrics, values, form)]."""
        import ray

        rows = [(tid, step, {k: v for k, v in metrics.items() if isinstance(v, int | float)},
                 values, form, self._max_steps.get(tid, step))
                for tid, step, metrics, values, form in evaluated]
        return ray.get(self._coordinator.round.remote(rows))

    def next_trial(self) -> TrialSpec | None:
        """The next waiting trial for this pack's freed slot, or None (the queue is empty)."""
        import ray

        spec = ray.get(self._coordinator.next_trial.remote(self._pack_id, self._group))
        while spec is not None and spec.trial_id in self._max_steps:
            # Already here: handed out just before a lost coordinator, and queued again by the
            # driver, which had not seen it train yet. Ask for the next one.
            spec = ray.get(self._coordinator.next_trial.remote(self._pack_id, self._group))
        if spec is not None:
            self.backfilled.append(spec)
            self._max_steps[spec.trial_id] = spec.max_steps
        return spec

    def on_trial_end(self, trial_id: str) -> None:
        self._coordinator.ended.remote(trial_id)  # fire and forget


class CoordinatorHooks:
    """What the driver hands every pack (through `dispatch`): the coordinator actor's handle, and
    `for_pack`, the engine's callbacks for one pack (a `WorkerHooks`), built in the worker."""

    def __init__(self, coordinator):
        self.coordinator = coordinator

    def for_pack(self, pack_id: str, base: BaseSpec, specs: list[TrialSpec]) -> WorkerHooks:
        return WorkerHooks(self.coordinator, pack_id, base, specs)
