"""FIFO: the scheduler that decides nothing. Every trial runs its budget; packs go as planned."""

from __future__ import annotations

from orchestrator.search.protocols import GO_ON, Decision, Report


class Fifo:
    """`sweep.scheduler=none`: no early stop, no exploit, no coordinator."""

    live = False
    backfill = False
    keeps_packs = False

    def __init__(self, config=None, num_trials: int = 0, objective=None):
        pass

    def eval_every(self, eval_every: int, max_steps: int) -> int:
        return eval_every

    def add_trial(self, trial_id: str, max_steps: int) -> None:
        pass

    def on_trial_result(self, trial_id: str, step: int, loss: float) -> Decision:
        return GO_ON

    def on_pack_results(self, reports: list[Report]) -> dict[str, Decision]:
        return {}

    def pending(self) -> list[str]:
        return []

    def on_trial_complete(self, trial_id: str) -> None:
        pass

    def stops(self) -> dict:
        return {}

    def params(self) -> dict:
        return {}
