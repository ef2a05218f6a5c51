"""The registry of search strategies: the names `sweep.strategy` and `sweep.scheduler` accept.

Each name maps to the class that implements it, as `"module:Class"` (imported when a sweep uses
it, so the config layer never imports the search layer) or as the class itself. The schema's
allowed values are read from these tables at validation time, so adding a strategy is one file
(a class speaking `orchestrator.search.protocols.Searcher` or `Scheduler`) and one entry here, or
one `register(...)` call before the config is validated (a test adds a toy scheduler that way).
"""

from __future__ import annotations

import importlib
from typing import Any

#: sweep.strategy -> a `Searcher` class, built as `cls(config, trials)`.
SEARCHERS: dict[str, Any] = {
    "grid": "orchestrator.search.searchers:FixedSearcher",
    "random": "orchestrator.search.searchers:FixedSearcher",
    "optuna": "orchestrator.search.optuna_rounds:OptunaSearch",
}
#: sweep.scheduler -> a `Scheduler` class, built as `cls(config, num_trials, objective)`.
SCHEDULERS: dict[str, Any] = {
    "none": "orchestrator.search.schedulers:Fifo",
    "asha": "orchestrator.search.asha:AshaScheduler",
    "pbt": "orchestrator.search.pbt:Pbt",
}
TABLES = {"strategy": SEARCHERS, "scheduler": SCHEDULERS}


def register(kind: str, name: str, target: Any) -> None:
    """Make `name` a value of `sweep.<kind>` (`strategy` or `scheduler`), implemented by
    `target` (a class, or "module:Class")."""
    TABLES[kind][name] = target


def resolve(kind: str, name: str) -> type:
    """The class registered as `sweep.<kind>=<name>`."""
    target = TABLES[kind][name]
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


class Registered:
    """A `Rule` (duck-typed: `allowed`, `ok`) whose values are a registry table's names, read
    when a value is checked, so a strategy registered later is accepted."""

    def __init__(self, kind: str):
        self.kind = kind

    @property
    def allowed(self) -> str:
        return "one of " + ", ".join(TABLES[self.kind])

    def ok(self, value: Any) -> bool:
        return value in TABLES[self.kind]
