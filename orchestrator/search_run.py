"""`SearchRun`: how a sweep's trials reach the workers, through a searcher and a scheduler.

`run_sweep` asks it for packs and feeds it what comes back. It speaks only the two protocols of
`orchestrator.search.protocols`, with the strategies named by `sweep.strategy` and
`sweep.scheduler` (`orchestrator.config.strategies`):

- The **searcher** suggests trials: grid and random all at once; Optuna a round at a time, the
  next once every trial of the round before has ended (asked when a worker is idle: `dispatch`'s
  `refill`, so idle workers keep their base).
- The **scheduler** acts while trials train. A `live` one lives in the `SearchCoordinator` actor,
  which every worker's hooks ask at each evaluation (ASHA: stop; PBT: exploit inside the pack);
  with `backfill`, each worker starts with a pack of up to `pack.max_adapters` trials and the
  others wait in the coordinator for a freed slot, filled without loading the base again. The
  scheduler sets when a trial is evaluated (ASHA: on every rung; PBT: every interval).

The run's trials grow as the searcher proposes: `take_new()` hands the driver the trials and
packs it has not seen, before any of their events are processed.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from orchestrator.cluster.connect import WorkerPlan, worker_env
from orchestrator.config.rules import parse_bytes
from orchestrator.config.schema import Config
from orchestrator.config.strategies import resolve
from orchestrator.planner import Pack, pack_key, plan
from orchestrator.search.coordinator import CoordinatorHooks, SearchCoordinator
from orchestrator.search.objective import Objective
from orchestrator.search.optuna_rounds import round_size
from orchestrator.search.protocols import Scheduler, Searcher
from orchestrator.search.trials import Trial, set_values
from qlora.config import TrialStatus


def _near_the_driver(workers: WorkerPlan):
    """Soft affinity to the driver's node (it restarts elsewhere if that node is gone); through
    Ray Client the driver has no node: Ray places it."""
    if workers.address.startswith("ray://"):
        return "DEFAULT"
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


class SearchRun:
    """The trials of one sweep as they are proposed, packed, backfilled and stopped."""

    def __init__(self, config: Config, trials: list[Trial], workers: WorkerPlan,
                 rows: dict | None = None):
        """`rows` ({DataSpec: RowTokens}, `DataShare.rows`): the data's longest rows, for the
        planner's memory estimate."""
        self.config = config
        self.num_workers = max(1, workers.num_workers)
        self.slots = self.num_workers * config.pack.max_adapters
        self._memory = dict(memory_budget=parse_bytes(config.pack.memory_budget),
                            device_type="cuda" if workers.gpus_per_worker else "cpu",
                            rows=rows)
        self.objective = Objective.of(config)
        self.searcher: Searcher = resolve("strategy", config.sweep.strategy)(config, trials)
        self.trials: list[Trial] = self.searcher.suggest(self.round_size)  # every trial so far
        self.scheduler: Scheduler = resolve("scheduler", config.sweep.scheduler)(
            config, self.searcher.expected, self.objective)
        self._coordinator = None
        if self.scheduler.live:  # it decides next to the workers, in an actor of its own
            import ray

            # Restarted by Ray when its process or node is lost, calls in flight retried; the
            # driver then restores it from what it saw (`_ensure`). Near the driver if it can.
            self._coordinator = ray.remote(SearchCoordinator).options(
                num_cpus=0, runtime_env={"env_vars": worker_env(workers)},
                max_restarts=-1, max_task_retries=-1, max_concurrency=8,
                scheduling_strategy=_near_the_driver(workers)).remote(
                    self.scheduler, self.objective)
        self._new_trials: list[Trial] = []
        self._new_packs: dict[str, list[str]] = {}
        self._ended: set[str] = set()
        self._stops: dict = {}
        # What a restarted coordinator gets back: the evaluations and ends in the order they
        # came, the trials queued per group, where each was seen training, and those packed.
        self._journal: list[tuple] = []
        self._queued: dict[str, list[str]] = {}
        self._seen: dict[str, str] = {}  # trial -> the pack it last reported from
        self._packed: set[str] = set()
        self._incarnation: str | None = None
        self._checked = 0.0

    @property
    def round_size(self) -> int:
        """Proposals per round (Optuna's)."""
        return round_size(self.config, self.slots)

    # -- packs ----------------------------------------------------------------------------------

    def plan(self, trials: list[Trial]) -> list[Pack]:
        """The packs that start `trials`; with a backfilling scheduler, the rest wait for a
        freed slot."""
        for trial in trials:
            every = self.scheduler.eval_every(trial.spec.eval_every, trial.spec.max_steps)
            if every != trial.spec.eval_every:
                set_values(trial, {"train.eval_every": every})
        first = trials
        if self.scheduler.live:
            import ray

            ray.get(self._coordinator.add_trials.remote(
                [(t.trial_id, t.spec.max_steps) for t in trials]))
        if self.scheduler.backfill:
            import ray

            groups: OrderedDict[str, list[Trial]] = OrderedDict()
            for trial in trials:
                groups.setdefault(pack_key(trial.base, trial.spec.data.seq_len), []).append(trial)
            first = [t for group in groups.values() for t in group[:self.slots]]
            for key, group in groups.items():
                if group[self.slots:]:
                    self._ensure()
                    ray.get(self._coordinator.add_waiting.remote(
                        key, [t.spec for t in group[self.slots:]]))
                    self._queued.setdefault(key, []).extend(t.trial_id for t in group[self.slots:])
        # Spread over the workers, unless a pack must stay what it was (PBT's populations): a
        # resumed sweep plans its unfinished trials again, and must cut the same packs.
        spread = 1 if self.scheduler.keeps_packs else self.num_workers
        self._packed.update(t.trial_id for t in first)
        return plan(first, self.config.pack.max_adapters, spread, **self._memory)

    def dispatch_options(self) -> dict:
        """`dispatch`'s hooks (a live scheduler's) and refill (more trials when a worker idles)."""
        options: dict = {"refill": self._refill}
        if self.scheduler.live:
            options["hooks"] = CoordinatorHooks(self._coordinator)
        return options

    def _refill(self) -> list[Pack]:
        """Packs for idle workers: trials still waiting (requeued after a lost worker), or the
        searcher's next suggestions."""
        packs = self._waiting_packs() if self.scheduler.backfill else []
        if packs:
            return packs
        trials = self.searcher.suggest(self.round_size)
        if not trials:
            return []
        self.trials += trials
        self._new_trials += trials
        packs = self.plan(trials)
        self._new_packs.update({p.pack_id: [t.trial_id for t in p.trials] for p in packs})
        return packs

    def _waiting_packs(self) -> list[Pack]:
        import ray

        self._ensure()
        waiting = ray.get(self._coordinator.waiting.remote())
        if not waiting:
            return []
        by_id = {t.trial_id: t for t in self.trials}
        packs = []
        for group in waiting:
            specs = ray.get(self._coordinator.take.remote(group, self.config.pack.max_adapters))
            trials = [dataclasses.replace(by_id[s.trial_id], spec=s) for s in specs]
            self._packed.update(t.trial_id for t in trials)
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

    def on_metrics(self, trial_id: str, step: int, metrics: dict, pack_id: str = "") -> None:
        """A streamed metrics point (Optuna's intermediate values; a live scheduler's journal)."""
        if self.scheduler.live:
            self._seen[trial_id] = pack_id
            if "eval_loss" in metrics:
                self._journal.append(("report", trial_id, step, {
                    k: v for k, v in metrics.items() if isinstance(v, int | float)}))
        value = self.objective.value(metrics)
        if value is not None:
            self.searcher.on_trial_result(trial_id, step, value)

    def on_trial_end(self, trial_id: str) -> None:
        """A trial's end as streamed (the journal's order: a coordinator forgets it from here)."""
        self._journal.append(("end", trial_id))

    def on_outcome(self, outcome, max_retries: int = 0) -> None:
        """A pack's outcome, before the driver records it. Trials that were backfilled into a
        pack whose worker was lost wait again (or fail, out of requeues: added to the results)."""
        if self.scheduler.backfill and outcome.error:
            import ray

            from qlora import TrialResult

            ended = [r.trial_id for r in outcome.results] + list(outcome.retried)
            self._ensure()
            _, given_up = ray.get(self._coordinator.orphans.remote(
                outcome.pack_id, ended + sorted(self._ended), max_retries))
            outcome.results.extend(
                TrialResult(trial_id=tid, status=TrialStatus.FAILED, steps=0, eval_loss=None,
                            reason=f"lost with its pack ({outcome.error}) too many times")
                for tid in given_up)
        for result in outcome.results:
            self._ended.add(result.trial_id)
            self._journal.append(("end", result.trial_id))
            self.searcher.on_trial_complete(result.trial_id, result.status,
                                            self.objective.of_result(result))

    def stop_of(self, trial_id: str):
        """The scheduler's `Stop` for a trial it stopped (rung, step, reason), or None."""
        if not self.scheduler.live:  # only a live scheduler stops trials
            return None
        if trial_id not in self._stops:
            import ray

            self._ensure()
            self._stops.update(ray.get(self._coordinator.stops.remote()))
        return self._stops.get(trial_id)

    def watch(self, every_s: float = 2.0) -> None:
        """From the driver's loop: restore the coordinator if Ray restarted it (`_ensure`),
        asking at most every `every_s`, and keep its decisions so far."""
        import time

        if self._coordinator is None or time.monotonic() - self._checked < every_s:
            return
        import ray

        self._ensure()
        self._stops.update(ray.get(self._coordinator.stops.remote()))

    def _ensure(self) -> None:
        """Give a coordinator Ray restarted the sweep's state as this driver saw it."""
        import time

        import ray

        self._checked = time.monotonic()
        incarnation, restored = ray.get(self._coordinator.incarnation.remote())
        if self._incarnation is None or restored:
            self._incarnation = incarnation
            return
        by_id = {t.trial_id: t for t in self.trials}
        started = set(self._seen) | self._ended
        waiting = {group: [by_id[t].spec for t in ids if t not in started and t not in self._packed]
                   for group, ids in self._queued.items()}
        handed: dict[str, list] = {}
        for group, ids in self._queued.items():
            for tid in ids:
                if tid in self._seen and tid not in self._packed and tid not in self._ended:
                    handed.setdefault(self._seen[tid], []).append((group, by_id[tid].spec))
        ray.get(self._coordinator.restore.remote(
            [(t.trial_id, t.spec.max_steps) for t in self.trials],
            {g: specs for g, specs in waiting.items() if specs}, handed, self._journal))
        self._incarnation = incarnation
        print(f"note: the search's coordinator was lost and restarted; restored from the driver "
              f"({len(self._journal)} evaluations and ends, "
              f"{sum(len(v) for v in waiting.values())} trials waiting)", flush=True)

    def params(self) -> dict:
        """What the parent run records about the search, besides the sweep's definition."""
        return {"sweep_scheduler": self.config.sweep.scheduler, **self.scheduler.params(),
                **self.searcher.params()}

    def close(self) -> None:
        """Tear down the coordinator actor (safe to call twice)."""
        if self._coordinator is not None:
            import ray

            try:
                ray.kill(self._coordinator)
            except Exception:  # Ray already gone (Ctrl-C, lost cluster): nothing to free
                pass
            self._coordinator = None
