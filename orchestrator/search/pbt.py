"""Population-based training (Jaderberg et al., 2017), where "exploit" is a copy in memory.

Every `sweep.pbt.interval` steps each trial is evaluated. After a pack's round of evaluations,
its trials are ranked by the sweep's objective; each trial in the bottom `quantile` takes the
state of one in the top `quantile` (drawn with a seed of its own: the sweep's seed, the trial,
the step) and that trial's hyperparameters, perturbed (`sweep.pbt.mutations`: x0.8 or x1.2, or
drawn again from the sweep's `params`). Only values no shape depends on change (`PBT_KEYS`:
learning rate, dropout, weight decay), never the rank.

The trials of a pack share one process and one base, so the copy is a tensor copy of adapter
and optimizer state inside the worker (`qlora.exploit`); each trial keeps its data stream and
its one MLflow run. A decision depends only on the pack's evaluations at that step and the seed,
never on timing or on other packs. So a resumed sweep makes the same decisions again: its
trials continue from checkpoints that hold what they took, a pack's trials go back to one step
(`qlora.exploit.align`), and packs are cut by `pack.max_adapters` alone (`keeps_packs`), so a
resume re-forms the same ones.

A population is a pack: put the trials that should compete in one pack (`pack.max_adapters` >=
the trials of a base). Trials in different packs do not exploit each other, and a trial takes
only the state of trials of its own form (modules, ranks, alpha: the same weights under another
scale would be another function).
"""

from __future__ import annotations

import math
import random

from orchestrator.config.rules import PBT_KEYS
from orchestrator.search.objective import Objective
from orchestrator.search.params import sweep_params
from orchestrator.search.protocols import EXPLOIT, Decision, Report
from orchestrator.search.schedulers import Fifo
from qlora.config import stable_hash

#: A perturbation multiplies by one of these.
FACTORS = (0.8, 1.2)
#: config key -> TrialSpec field (`qlora.exploit.MUTABLE`).
FIELD = {"train.learning_rate": "learning_rate", "lora.dropout": "dropout",
         "train.weight_decay": "weight_decay"}
assert set(FIELD) == set(PBT_KEYS)


class Pbt(Fifo):
    """`sweep.scheduler=pbt` as a `Scheduler` (FIFO's answers but for the rounds' exploits)."""

    live = True
    backfill = False  # the population trains at once: a waiting trial would be a generation late
    keeps_packs = True  # a pack is a population: a resumed sweep must re-form the same ones

    def __init__(self, config, num_trials: int = 0, objective: Objective | None = None):
        pbt = config.sweep.pbt
        self.interval, self.quantile = pbt.interval, pbt.quantile
        self.mutations = dict(pbt.mutations)
        self.space = sweep_params(config.sweep)
        self.seed = config.seed
        self.objective = objective or Objective()

    def eval_every(self, eval_every: int, max_steps: int) -> int:
        return self.interval

    def on_pack_results(self, reports: list[Report]) -> dict[str, Decision]:
        """The exploits of one pack's round: bottom quantile <- top quantile, among the trials of
        one form (the same modules, ranks and scales)."""
        ready = [r for r in reports
                 if r.step % self.interval == 0 and r.step < r.max_steps and math.isfinite(r.loss)]
        out: dict[str, Decision] = {}
        for form in sorted({r.form for r in ready}):
            out.update(self._exploits([r for r in ready if r.form == form]))
        return out

    def _exploits(self, ready: list[Report]) -> dict[str, Decision]:
        if len(ready) < 2:
            return {}
        ready.sort(key=lambda r: (r.loss, r.trial_id))
        n = max(1, math.floor(len(ready) * self.quantile))
        top, bottom = ready[:n], ready[-n:]
        best = {r.trial_id for r in top}
        out = {}
        for report in bottom:
            if report.trial_id in best:
                continue
            rng = random.Random(stable_hash([self.seed, report.trial_id, report.step], 16))
            source = rng.choice(top)
            values = self.mutate(source.values, rng)
            shown = [(r.loss if self.objective.mode == "min" else -r.loss) for r in (report, source)]
            changed = ", ".join(f"{k} {v:.3g}" for k, v in values.items())
            out[report.trial_id] = Decision(
                EXPLOIT, source.trial_id, values,
                f"pbt: {self.objective.metric} {shown[0]:.4f} at step {report.step} is in the "
                f"bottom {self.quantile:g} of {len(ready)}; takes {source.trial_id}'s state "
                f"({shown[1]:.4f}) with {changed}")
        return out

    def mutate(self, values: dict, rng: random.Random) -> dict:
        """The source's values with `mutations` applied."""
        out = dict(values)
        for key, how in self.mutations.items():
            name = FIELD[key]
            if how == "resample" and key in self.space:
                out[name] = _draw(self.space[key], rng)
            else:
                out[name] = out[name] * rng.choice(FACTORS)
            if name == "dropout":
                out[name] = min(out[name], 0.9)
        return out

    def params(self) -> dict:
        return {"pbt_interval": self.interval, "pbt_quantile": f"{self.quantile:g}",
                "pbt_mutations": ",".join(f"{k}:{v}" for k, v in self.mutations.items())}


def _draw(spec, rng: random.Random) -> float:
    """A value of a sweep's `params` entry: a list's element or a range's draw."""
    if isinstance(spec, list):
        return float(rng.choice(spec))
    low, high = float(spec["low"]), float(spec["high"])
    if spec.get("log"):
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)
