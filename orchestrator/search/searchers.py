"""Grid and random search as a `Searcher`: the sweep's trials, expanded once, handed out at once."""

from __future__ import annotations

from orchestrator.search.expand import expand


class FixedSearcher:
    """`sweep.strategy=grid|random`: a fixed list (`orchestrator.search.expand`), all suggested
    the first time; results change nothing."""

    def __init__(self, config, trials: list | None = None):
        self._todo = list(trials) if trials is not None else expand(config)
        self.expected = len(self._todo)

    def suggest(self, n: int) -> list:
        todo, self._todo = self._todo, []
        return todo

    def on_trial_result(self, trial_id: str, step: int, value: float) -> None:
        pass

    def on_trial_complete(self, trial_id: str, status: str, value: float | None) -> None:
        pass

    def params(self) -> dict:
        return {}
