"""The two small interfaces every search strategy speaks (Ray Tune's shape).

A **searcher** decides which trials to train: `suggest(n)` gives up to n new ones (none while it
waits for results), and it hears each evaluation (`on_trial_result`) and each end
(`on_trial_complete`). Grid and random search hand out their fixed list at once
(`orchestrator.search.searchers`); Optuna proposes round by round (`optuna_rounds`).

A **scheduler** decides what happens to trials while they train: it answers each evaluation
with a `Decision` (continue, stop), answers a pack's evaluation round as a whole (exploit: a trial
takes another's state and new hyperparameters), and may stop trials later (`pending`). FIFO
(`schedulers.Fifo`) does nothing; ASHA (`asha.AshaScheduler`) stops; PBT (`pbt.Pbt`) exploits.
A scheduler that is `live` runs in the coordinator actor next to the workers; one that
`backfill`s keeps trials beyond the free adapter slots waiting for a freed slot.

The driver (`orchestrator/search_run.py`), the coordinator and the worker hooks
(`orchestrator/search/coordinator.py`) speak only these. Adding a strategy: write the class in
a file of `orchestrator/search/`, add its name to `orchestrator/config/strategies.py` (or call
`register`), and the schema accepts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

CONTINUE, STOP, EXPLOIT = "continue", "stop", "exploit"


@dataclass(frozen=True)
class Decision:
    """A scheduler's answer for one trial: continue, stop, or exploit `source` with `values`
    (TrialSpec fields of `qlora.exploit.MUTABLE`)."""

    action: str = CONTINUE
    source: str | None = None
    values: dict = field(default_factory=dict)
    reason: str = ""


GO_ON = Decision()


@dataclass(frozen=True)
class Report:
    """One trial's evaluation in a pack's round: the objective as a loss (smaller is better),
    its current mutable hyperparameters (TrialSpec field -> value), its budget, and its form
    (`qlora.exploit.form_of`: only trials of one form can take each other's state)."""

    trial_id: str
    step: int
    loss: float
    values: dict
    max_steps: int
    form: str = ""


class Searcher(Protocol):
    expected: int  # the trials the sweep will run in all (a budget for model-based search)

    def suggest(self, n: int) -> list: ...  # up to n new `Trial`s; [] while waiting or done
    def on_trial_result(self, trial_id: str, step: int, value: float) -> None: ...
    def on_trial_complete(self, trial_id: str, status: str, value: float | None) -> None: ...
    def params(self) -> dict[str, Any]: ...  # what the parent run records about it


class Scheduler(Protocol):
    live: bool  # workers consult it while they train (through the coordinator actor)
    backfill: bool  # trials beyond the free slots wait for a freed slot of a running pack
    keeps_packs: bool  # packs cut by pack.max_adapters alone, so a resume re-forms the same ones

    def eval_every(self, eval_every: int, max_steps: int) -> int: ...  # when to evaluate a trial
    def add_trial(self, trial_id: str, max_steps: int) -> None: ...
    def on_trial_result(self, trial_id: str, step: int, loss: float) -> Decision: ...
    def on_pack_results(self, reports: list[Report]) -> dict[str, Decision]: ...
    def pending(self) -> list[str]: ...  # trials to stop now, decided after their result
    def on_trial_complete(self, trial_id: str) -> None: ...
    def stops(self) -> dict: ...  # trial -> `asha.Stop` for the trials it stopped
    def params(self) -> dict[str, Any]: ...
