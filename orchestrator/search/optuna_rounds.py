"""Model-based search: Optuna's TPE sampler proposes trials from the results so far (ask/tell).

`sweep=optuna` gives a budget (`sweep.num_trials`) and a space (`sweep.params`: a list is a
categorical choice, `{low, high, log, type}` a number). Proposals come in rounds of
`sweep.optuna.batch_size` (default: every adapter slot of the sweep), and a round is asked only
once every trial of the round before has been told its result: so each proposal is a function of
the seed and the earlier results alone, never of which worker finished first, and a sweep with
the same seed proposes the same trials again. Within a round, TPE's constant liar spreads the
proposals out. The first `sweep.optuna.startup_trials` proposals are drawn at random.

What Optuna is told: a finished trial's final `sweep.objective` (direction from `sweep.mode`); a trial stopped by ASHA is PRUNED
(with its rung evaluations as intermediate values, reported as they stream in); a trial that
diverged or failed is FAIL. A proposal that repeats an earlier trial's config (the same trial id)
is told that trial's value and asked again, so the budget counts distinct trials.

The study lives in the driver's memory (resume does not restore it).
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.search.params import sweep_params
from orchestrator.search.trials import Trial, apply, make_trial, snap, trial_id
from qlora.config import TrialStatus

#: Proposals in a row that repeat earlier trials before the space counts as exhausted.
MAX_REPEATS = 200
_PRIMITIVE = (int, float, str, bool, type(None))


def round_size(cfg: Config, slots: int | None = None) -> int:
    """Proposals per round: `sweep.optuna.batch_size`, else `slots` (the sweep's adapter slots:
    workers x pack.max_adapters), else pack.max_adapters x cluster.num_workers (or 1 worker)."""
    if cfg.sweep.optuna.batch_size:
        return cfg.sweep.optuna.batch_size
    if slots:
        return slots
    return cfg.pack.max_adapters * (cfg.cluster.num_workers or 1)


class OptunaSearch:
    """Ask/tell over one in-memory study, turning proposals into this project's `Trial`s."""

    def __init__(self, cfg: Config, trials: list | None = None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.cfg = cfg
        self.space = sweep_params(cfg.sweep)  # normalized (ranges with log and type)
        self.budget = cfg.sweep.num_trials or 1
        sampler = optuna.samplers.TPESampler(seed=cfg.seed,
                                             n_startup_trials=cfg.sweep.optuna.startup_trials)
        from orchestrator.search.objective import Objective

        self.study = optuna.create_study(direction=Objective.of(cfg).direction, sampler=sampler)
        self.trials: list[Trial] = []  # distinct trials proposed, in order
        self._optuna: dict[str, Any] = {}  # trial_id -> its optuna.Trial
        self._values: dict[str, float | None] = {}  # trial_id -> the value told (None: not one)
        self._open: set[str] = set()  # proposed, not yet told
        self._names: set[str] = set()
        self.exhausted = False  # the space gave only repeats
        self.round: int | None = None  # proposals per round, as the driver asks them

    @property
    def remaining(self) -> int:
        """Trials of the budget not yet proposed (0 once the space is exhausted)."""
        return 0 if self.exhausted else max(0, self.budget - len(self.trials))

    @property
    def waiting_for_results(self) -> bool:
        """Whether a proposed trial has not been told yet (the next round must wait)."""
        return bool(self._open)

    def ask(self, n: int) -> list[Trial]:
        """Up to `n` new trials (fewer when the budget or the space runs out)."""
        from optuna.trial import TrialState

        new: list[Trial] = []
        wanted = min(n, self.remaining)
        repeats = 0
        while len(new) < wanted:
            ot = self.study.ask()
            params = {key: _suggest(ot, key, spec) for key, spec in self.space.items()}
            config = apply(self.cfg, params)
            tid = trial_id(config)
            if tid in self._optuna:  # the same config again: it has (or will have) its own result
                value = self._values.get(tid)
                if value is not None:
                    self.study.tell(ot, value)
                else:
                    self.study.tell(ot, state=TrialState.FAIL)
                repeats += 1
                if repeats >= MAX_REPEATS:
                    self.exhausted = True
                    break
                continue
            repeats = 0
            trial = make_trial(config, params, tid, taken=self._names)
            self._names.add(trial.name)
            self._optuna[tid] = ot
            self._open.add(tid)
            self.trials.append(trial)
            new.append(trial)
        return new

    # -- as a `Searcher` (orchestrator.search.protocols) ----------------------------------------

    @property
    def expected(self) -> int:
        return self.budget

    def suggest(self, n: int) -> list[Trial]:
        """The next round (up to `n`), once every trial of the round before has its result."""
        self.round = n
        if self.waiting_for_results or not self.remaining:
            return []
        return self.ask(n)

    def on_trial_result(self, trial_id: str, step: int, value: float) -> None:
        self.report(trial_id, step, value)

    def on_trial_complete(self, trial_id: str, status: str, value: float | None) -> None:
        self.tell(trial_id, status, value)

    def params(self) -> dict:
        return {"optuna_round_size": self.round or round_size(self.cfg),
                "optuna_startup_trials": self.cfg.sweep.optuna.startup_trials,
                "optuna_sampler": "TPESampler"}

    # -- ask and tell --------------------------------------------------------------------------

    def report(self, trial_id: str, step: int, value: float) -> None:
        """An intermediate objective value of an open trial."""
        ot = self._optuna.get(trial_id)
        if ot is not None and trial_id in self._open and math.isfinite(value):
            ot.report(float(value), int(step))

    def tell(self, trial_id: str, status: str, eval_loss: float | None) -> None:
        """A trial's end: finished -> its objective (`eval_loss` names it here), stopped ->
        PRUNED, otherwise FAIL."""
        from optuna.trial import TrialState

        if trial_id not in self._open:
            return
        self._open.discard(trial_id)
        ot = self._optuna[trial_id]
        if status == TrialStatus.FINISHED and eval_loss is not None and math.isfinite(eval_loss):
            self._values[trial_id] = float(eval_loss)
            self.study.tell(ot, float(eval_loss))
        elif status == TrialStatus.STOPPED:
            self.study.tell(ot, state=TrialState.PRUNED)
        else:
            self.study.tell(ot, state=TrialState.FAIL)


def first_round(cfg: Config) -> list[Trial]:
    """The trials of the first round (a preview: later rounds depend on results)."""
    return OptunaSearch(cfg).ask(round_size(cfg))


def _suggest(ot, key: str, spec: Any) -> Any:
    """One value of `key` from the optuna trial `ot`, for a list or a range of this project."""
    if isinstance(spec, list):
        if all(isinstance(v, _PRIMITIVE) for v in spec):
            return ot.suggest_categorical(key, spec)
        return spec[ot.suggest_categorical(key, list(range(len(spec))))]  # e.g. lists of modules
    low, high, log = spec["low"], spec["high"], spec["log"]
    if spec["type"] == "int":
        return snap(ot.suggest_int(key, int(low), int(high), log=log), spec)
    return snap(ot.suggest_float(key, float(low), float(high), log=log), spec)
