"""`SearchRun`: how a sweep's trials reach the workers, beyond one fixed list of packs.

`run_sweep` asks it for packs and feeds it what comes back; three kinds of sweep go through it:

- **A fixed list** (grid, random, no scheduler): the planner's packs, nothing more.
- **A scheduler** (`sweep.scheduler=asha`): each worker starts with a pack of up to
  `pack.max_adapters` trials; the other trials wait in the `SearchCoordinator` actor, which the
  workers ask at every evaluation whether a trial goes on (`orchestrator.search.asha`) and, when a trial
  ends, for the next waiting one to fill its slot without loading the base again (backfill).
  Trials are evaluated at every rung (their spec's `eval_every`, see `asha.eval_every_for`).
- **Optuna** (`sweep.strategy=optuna`): rounds of proposals (`orchestrator.search.optuna_rounds`); the
  next round is asked, planned and sent to the idle workers (which keep their base) once every
  trial of the round before has ended (`dispatch`'s `refill`).

The run's trials grow as Optuna proposes: `take_new()` hands the driver the trials and packs it
has not seen, before any of their events are processed.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from orchestrator.cluster.connect import WorkerPlan, worker_env
from orchestrator.config.rules import parse_bytes
from orchestrator.config.schema import Config
from orchestrator.planner import Pack, pack_key, plan
from orchestrator.search.asha import Asha, eval_every_for, rung_steps
from orchestrator.search.coordinator import CoordinatorHooks, SearchCoordinator
from orchestrator.search.objective import Objective
from orchestrator.search.optuna_rounds import OptunaSearch, round_size
from orchestrator.search.trials import Trial, set_values
from qlora.config import TrialStatus


class SearchRun:
    """The trials of one sweep as they are proposed, packed, backfilled and stopped."""

    def __init__(self, config: Config, trials: list[Trial], workers: WorkerPlan):
        self.config = config
        self.num_workers = max(1, workers.num_workers)
        self.slots = self.num_workers * config.pack.max_adapters
        self._memory = dict(memory_budget=parse_bytes(config.pack.memory_budget),
                            device_type="cuda" if workers.gpus_per_worker else "cpu")
        self.scheduler = config.sweep.scheduler
        self.objective = Objective.of(config)
        self._optuna: OptunaSearch | None = None
        if config.sweep.strategy == "optuna":
            self._optuna = OptunaSearch(config)
            trials = self._optuna.ask(self.round_size)
        self.trials: list[Trial] = list(trials)  # every trial so far, in the order proposed
        self.expected = (config.sweep.num_trials if self._optuna is not None
                         else len(self.trials))
        self._coordinator = None
        if self.scheduler == "asha":
            import ray

            asha = Asha(config.sweep.asha.rungs, config.sweep.asha.eta, self.expected,
                        self.objective)
            self._coordinator = ray.remote(SearchCoordinator).options(
                num_cpus=0, runtime_env={"env_vars": worker_env(workers)}).remote(
                    asha, self.objective)
        self._new_trials: list[Trial] = []
        self._new_packs: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._stops: dict = {}

    @property
    def round_size(self) -> int:
        """Optuna's proposals per round."""
        return round_size(self.config, self.slots)

    # -- packs ----------------------------------------------------------------------------------

    def plan(self, trials: list[Trial]) -> list[Pack]:
        """The packs that start `trials`; with a scheduler, the rest wait for a freed slot."""
        if self._coordinator is None:
            return plan(trials, self.config.pack.max_adapters, self.num_workers, **self._memory)
        import ray

        for trial in trials:
            steps = rung_steps(trial.spec.max_steps, self.config.sweep.asha.rungs)
            every = eval_every_for(trial.spec.eval_every, steps)
            if every != trial.spec.eval_every:
                set_values(trial, {"train.eval_every": every})
        groups: OrderedDict[str, list[Trial]] = OrderedDict()
        for trial in trials:
            groups.setdefault(pack_key(trial.base, trial.spec.data.seq_len), []).append(trial)
        first = [t for group in groups.values() for t in group[:self.slots]]
        ray.get(self._coordinator.add_trials.remote(
            [(t.trial_id, t.spec.max_steps) for t in trials]))
        for key, group in groups.items():
            if group[self.slots:]:
                ray.get(self._coordinator.add_waiting.remote(
                    key, [t.spec for t in group[self.slots:]]))
        return plan(first, self.config.pack.max_adapters, self.num_workers, **self._memory)

    def dispatch_options(self) -> dict:
        """`dispatch`'s coordinator and refill for this search (none for a fixed list)."""
        options = {}
        if self._coordinator is not None:
            options["hooks"] = CoordinatorHooks(self._coordinator)
        if self._coordinator is not None or self._optuna is not None:
            options["refill"] = self._refill
        return options

    def _refill(self) -> list[Pack]:
        """Packs for idle workers: trials still waiting (requeued after a lost worker), or
        Optuna's next round once the last one has ended."""
        packs: list[Pack] = []
        if self._coordinator is not None:
            packs += self._waiting_packs()
        if packs or self._optuna is None:
            return packs
        if self._optuna.waiting_for_results or not self._optuna.remaining:
            return []
        trials = self._optuna.ask(self.round_size)
        self.trials += trials
        self._new_trials += trials
        packs = self.plan(trials)
        self._new_packs.update({p.pack_id: [t.trial_id for t in p.trials] for p in packs})
        return packs

    def _waiting_packs(self) -> list[Pack]:
        import ray

        waiting = ray.get(self._coordinator.waiting.remote())
        if not waiting:
            return []
        by_id = {t.trial_id: t for t in self.trials}
        packs = []
        for group in waiting:
            specs = ray.get(self._coordinator.take.remote(group, self.config.pack.max_adapters))
            trials = [dataclasses.replace(by_id[s.trial_id], spec=s) for s in specs]
            packs += plan(trials, self.config.pack.max_adapters, 1, **self._memory)
        for p in packs:
            self._new_packs[p.pack_id] = [t.trial_id for t in p.trials]
        return packs

    # -- what comes back ------------------------------------------------------------------------

    def take_new(self) -> tuple[list[Trial], dict[str, list[str]]]:
        """Trials and packs (id -> trial ids) added since the last call, for the driver to show
        and record before it handles their events."""
        trials, packs = self._new_trials, self._new_packs
        self._new_trials, self._new_packs = [], {}
        return trials, packs

    def on_metrics(self, trial_id: str, step: int, metrics: dict) -> None:
        """A streamed metrics point (Optuna's intermediate values)."""
        value = self.objective.value(metrics)
        if self._optuna is not None and value is not None:
            self._optuna.report(trial_id, step, value)

    def on_outcome(self, outcome, max_retries: int = 0) -> None:
        """A pack's outcome, before the driver records it. Trials that were backfilled into a
        pack whose worker was lost wait again (or fail, out of requeues: added to the results)."""
        if self._coordinator is not None and outcome.error:
            import ray

            from qlora import TrialResult

            ended = [r.trial_id for r in outcome.results] + list(outcome.retried)
            _, given_up = ray.get(self._coordinator.orphans.remote(
                outcome.pack_id, ended + sorted(self._ended), max_retries))
            outcome.results.extend(
                TrialResult(trial_id=tid, status=TrialStatus.FAILED, steps=0, eval_loss=None,
                            reason=f"lost with its pack ({outcome.error}) too many times")
                for tid in given_up)
        for result in outcome.results:
            self._ended.add(result.trial_id)
            if self._optuna is not None:
                self._optuna.tell(result.trial_id, result.status,
                                  self.objective.of_result(result))

    def stop_of(self, trial_id: str):
        """ASHA's `Stop` for a trial it stopped (rung, step, reason), or None."""
        if self._coordinator is None:
            return None
        if trial_id not in self._stops:
            import ray

            self._stops = ray.get(self._coordinator.stops.remote())
        return self._stops.get(trial_id)

    def params(self) -> dict:
        """What the parent run records about the search, besides the sweep's definition."""
        sweep = self.config.sweep
        out = {"sweep_scheduler": sweep.scheduler}
        if self.scheduler == "asha":
            out.update(asha_rungs=",".join(f"{f:g}" for f in sweep.asha.rungs),
                       asha_eta=f"{sweep.asha.eta:g}",
                       asha_keep=",".join(str(Asha(sweep.asha.rungs, sweep.asha.eta,
                                                   self.expected).keep(k))
                                          for k in range(len(sweep.asha.rungs))))
        if self._optuna is not None:
            out.update(optuna_round_size=self.round_size,
                       optuna_startup_trials=sweep.optuna.startup_trials,
                       optuna_sampler="TPESampler")
        return out

    def close(self) -> None:
        """Tear down the coordinator actor (safe to call twice)."""
        if self._coordinator is not None:
            import ray

            try:
                ray.kill(self._coordinator)
            except Exception:  # Ray already gone (Ctrl-C, lost cluster): nothing to free
                pass
            self._coordinator = None
