"""Successive halving, asynchronous: compare trials at rungs, stop the ones that cannot win.

Each trial is evaluated at its rungs, fractions of its own `max_steps` (`sweep.asha.rungs`, e.g.
1/4 and 1/2; the last rung is the end). Past rung k (1-based) only the best

    keep_k = max(1, floor(N / eta^k))

of the sweep's N trials go on. A trial is stopped as soon as `keep_k` other trials have done
better at its latest rung: whatever the trials still to come do, it can no longer be among the
best `keep_k` there. So a decision never depends on the order trials arrive in, and the best
trial at each rung is never stopped (it is synchronous successive halving's selection, reached
without waiting for every trial at a rung). The price is that a trial whose standing is not yet
settled keeps training until it is: a later, better trial can stop it after its rung, when it
has already trained some steps beyond it.

Which rung and why is kept as a `Stop` and lands on the trial's MLflow run as the tags
`qlora.stopped_at_rung` and `qlora.stop_reason`; a stopped trial's run ends FINISHED (it did
what the search asked of it) with `qlora.status=stopped`, and does not count as a failure.

This module is the rule only (no Ray): `orchestrator.search.coordinator` runs it next to the workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

from orchestrator.search.objective import Objective
from orchestrator.search.protocols import GO_ON, STOP, Decision, Report


@dataclass(frozen=True)
class Stop:
    """Why a trial was stopped: at which rung (1-based) and step, and the comparison."""

    trial_id: str
    rung: int
    step: int
    reason: str


def rung_steps(max_steps: int, fractions: list[float]) -> list[int]:
    """The steps (increasing, before `max_steps`) where a trial of `max_steps` is compared."""
    steps = sorted({round(f * max_steps) for f in fractions})
    return [s for s in steps if 1 <= s < max_steps]


def eval_every_for(eval_every: int, steps: list[int]) -> int:
    """An evaluation interval that lands on every rung step.

    `eval_every` is kept when every rung is a multiple of it; else the rungs' greatest common
    divisor is used. Evaluating more often never changes a trial's numbers (evaluation draws no
    randomness and touches no weights), so the trial keeps its id.
    """
    if not steps or (eval_every > 0 and all(s % eval_every == 0 for s in steps)):
        return eval_every
    return reduce(math.gcd, steps)


class Asha:
    """The rung table of one sweep and the stopping rule over it."""

    def __init__(self, fractions: list[float], eta: float, num_trials: int,
                 objective: Objective | None = None):
        self.objective = objective or Objective()  # names the metric in a stop's reason
        self.fractions = list(fractions)
        self.eta = float(eta)
        self.num_trials = max(1, int(num_trials))  # N: the trials the sweep will run in all
        self._steps: dict[str, list[int]] = {}  # trial -> its rung steps
        self._results: list[dict[str, float]] = [{} for _ in self.fractions]  # rung -> trial -> loss
        self._latest: dict[str, int] = {}  # trial -> index of the latest rung it reported
        self.stops: dict[str, Stop] = {}

    def keep(self, rung: int) -> int:
        """How many trials go on past rung `rung` (0-based index)."""
        return max(1, math.floor(self.num_trials / self.eta ** (rung + 1) + 1e-9))

    def add_trial(self, trial_id: str, max_steps: int) -> None:
        """Make a trial known (its rungs follow from its own `max_steps`)."""
        self._steps[trial_id] = rung_steps(max_steps, self.fractions)

    def report(self, trial_id: str, step: int, eval_loss: float) -> Stop | None:
        """Record an evaluation; at a rung, return a `Stop` if the trial must not go on.
        `eval_loss` is the objective's `loss` (smaller is better)."""
        steps = self._steps.get(trial_id)
        if steps is None or step not in steps or trial_id in self.stops:
            return self.stops.get(trial_id)
        rung = steps.index(step)
        loss = eval_loss if math.isfinite(eval_loss) else math.inf
        self._results[rung][trial_id] = loss
        self._latest[trial_id] = rung
        return self.check(trial_id)

    def check(self, trial_id: str) -> Stop | None:
        """A `Stop` if `keep` others have beaten the trial at its latest rung (it is then kept)."""
        if trial_id in self.stops:
            return self.stops[trial_id]
        rung = self._latest.get(trial_id)
        if rung is None:
            return None
        results = self._results[rung]
        mine = results[trial_id]
        better = sum(1 for tid, loss in results.items() if tid != trial_id and loss < mine)
        keep = self.keep(rung)
        if better < keep:
            return None
        step = self._steps[trial_id][rung]
        shown = mine if self.objective.mode == "min" else -mine
        reason = (f"asha: {self.objective.metric} {shown:.4f} at rung {rung + 1} (step {step}) is beaten by "
                  f"{better} of {len(results)} trials there; only the best {keep} of "
                  f"{self.num_trials} go on (eta={self.eta:g})")
        stop = Stop(trial_id, rung + 1, step, reason)
        self.stops[trial_id] = stop
        return stop

    def pending_stops(self) -> list[str]:
        """Trials past a rung that later results have ruled out (checked again now)."""
        for tid in list(self._latest):
            self.check(tid)
        return list(self.stops)

    def forget(self, trial_id: str) -> None:
        """A trial that ended: nothing more to decide for it (its results stay as evidence)."""
        self._latest.pop(trial_id, None)


class AshaScheduler:
    """`sweep.scheduler=asha` as a `Scheduler`: `Asha`'s rule, stops at rungs, backfill."""

    live = True
    backfill = True
    keeps_packs = False

    def __init__(self, config, num_trials: int, objective: Objective | None = None):
        self.rungs, self.eta = list(config.sweep.asha.rungs), config.sweep.asha.eta
        self.asha = Asha(self.rungs, self.eta, num_trials, objective)

    @classmethod
    def of(cls, asha: Asha) -> AshaScheduler:
        """The scheduler around a rung table built already."""
        scheduler = cls.__new__(cls)
        scheduler.rungs, scheduler.eta, scheduler.asha = asha.fractions, asha.eta, asha
        return scheduler

    def eval_every(self, eval_every: int, max_steps: int) -> int:
        return eval_every_for(eval_every, rung_steps(max_steps, self.rungs))

    def add_trial(self, trial_id: str, max_steps: int) -> None:
        self.asha.add_trial(trial_id, max_steps)

    def on_trial_result(self, trial_id: str, step: int, loss: float) -> Decision:
        stop = self.asha.report(trial_id, step, loss)
        return GO_ON if stop is None else Decision(STOP, reason=stop.reason)

    def on_pack_results(self, reports: list[Report]) -> dict[str, Decision]:
        return {}

    def pending(self) -> list[str]:
        return self.asha.pending_stops()

    def on_trial_complete(self, trial_id: str) -> None:
        self.asha.forget(trial_id)

    def stops(self) -> dict[str, Stop]:
        return dict(self.asha.stops)

    def params(self) -> dict:
        return {"asha_rungs": ",".join(f"{f:g}" for f in self.rungs),
                "asha_eta": f"{self.eta:g}",
                "asha_keep": ",".join(str(self.asha.keep(k)) for k in range(len(self.rungs)))}
