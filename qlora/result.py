"""`TrialResult`: how a trial of a pack ended, what `train_pack` returns for each."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import TrialSpec, TrialStatus


@dataclass
class TrialResult:
    """How a trial ended. `adapter` holds its PEFT files for finished (and early-stopped) trials."""

    trial_id: str
    status: TrialStatus
    steps: int
    eval_loss: float | None
    train_losses: list[float] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    reason: str | None = None
    adapter: dict[str, bytes] | None = None
    data: dict = field(default_factory=dict)  # data_hash and example counts, to trace the result
    spec: TrialSpec | None = None  # what it trained with
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation's: eval_loss, eval_...
    samples: list[dict] = field(default_factory=list)  # the last evaluation's generated answers
    exploits: list[dict] = field(default_factory=list)  # PBT: {step, source, values} of each copy
