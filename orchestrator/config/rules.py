"""The allowed values of every key: one `Rule` (what is allowed, and a check) per dotted key.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qlora.config import (
    COMPUTE_DTYPES,
    DATA_FORMATS,
    DATA_PACKING,
    LR_SCHEDULES,
    OPTIMIZERS,
    QUANT_TYPES,
)

STRATEGIES = ("grid", "random", "optuna")
SCHEDULERS = ("none", "asha")
#: Strategies that draw trials, and so take ranges {low, high} and need `sweep.num_trials`.
DRAWING = ("random", "optuna")
#: Per-trial keys that stay out of sweeps: they shape the shared base, not one adapter.
BASE_ONLY_TRAIN_KEYS = ("gradient_checkpointing", "activation_offload")
#: train.* keys that hold for the whole sweep: how often trials are checkpointed, fault injection.
SWEEP_WIDE_TRAIN_KEYS = ("checkpoint_every", "inject_oom_at_step")
RANGE_KEYS = ("low", "high", "log", "type")


@dataclass(frozen=True)
class Rule:
    """What a key accepts: `allowed` reads after "must be" in an error, `ok` tests a typed value."""

    allowed: str
    ok: Callable[[Any], bool] = lambda v: True


def _choice(values: tuple[str, ...]) -> Rule:
    return Rule("one of " + ", ".join(values), lambda v: v in values)


def _nonempty(noun: str = "a non-empty string") -> Rule:
    return Rule(noun, lambda v: bool(str(v).strip()))


_RAY_URL = re.compile(r"^ray://[^\s:/]+:(\d{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DB_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's other SQLAlchemy backends


def _ray_address_ok(v: str) -> bool:
    if v in ("local", "auto"):
        return True
    m = _RAY_URL.match(v)
    return bool(m) and 1 <= int(m.group(1)) <= 65535


RULES: dict[str, Rule] = {
    "model.name_or_path": _nonempty("'tiny', a local folder or a hub id such as org/name"),
    "data.path": _nonempty("a file path or null (the bundled dataset)"),
    "data.eval_path": _nonempty("a file path or null"),
    "data.format": _choice(DATA_FORMATS),
    "data.eval_fraction": Rule("a number in [0, 1)", lambda v: 0 <= v < 1),
    "data.packing": _choice(DATA_PACKING),
    "data.max_eval_examples": Rule("an integer >= 1 or null", lambda v: v is None or v >= 1),
    "quant.type": _choice(QUANT_TYPES),
    "quant.compute_dtype": _choice(COMPUTE_DTYPES),
    "lora.r": Rule("an integer in 1..1024", lambda v: 1 <= v <= 1024),
    "lora.alpha": Rule("a number > 0", lambda v: v > 0),
    "lora.dropout": Rule("a number in [0, 1)", lambda v: 0 <= v < 1),
    "lora.target_modules": Rule(
        "'all-linear' or a non-empty list of module names such as [q_proj, v_proj]",
        lambda v: bool(v) and all(str(x).strip() for x in ([v] if isinstance(v, str) else v)),
    ),
    "train.learning_rate": Rule("a number in (0, 1]", lambda v: 0 < v <= 1),
    "train.max_steps": Rule("an integer in 1..10000000", lambda v: 1 <= v <= 10_000_000),
    "train.micro_batch_size": Rule("an integer >= 1", lambda v: v >= 1),
    "train.grad_accum_steps": Rule("an integer >= 1", lambda v: v >= 1),
    "train.seq_len": Rule("an integer in 8..131072", lambda v: 8 <= v <= 131072),
    "train.optimizer": _choice(OPTIMIZERS),
    "train.weight_decay": Rule("a number >= 0", lambda v: v >= 0),
    "train.warmup_steps": Rule("an integer >= 0", lambda v: v >= 0),
    "train.lr_schedule": _choice(LR_SCHEDULES),
    "train.max_grad_norm": Rule("a number >= 0 (0 disables clipping)", lambda v: v >= 0),
    "train.eval_every": Rule("an integer >= 0 (0 = only at the end)", lambda v: v >= 0),
    "train.checkpoint_every": Rule("an integer >= 0 (0 = only when a trial ends)",
                                   lambda v: v >= 0),
    "train.inject_oom_at_step": Rule("an integer >= 1 or null (testing only)",
                                     lambda v: v is None or v >= 1),
    "pack.max_adapters": Rule("an integer in 1..64", lambda v: 1 <= v <= 64),
    "cluster.address": Rule("local, auto or ray://HOST:PORT", _ray_address_ok),
    "cluster.num_workers": Rule("an integer >= 1 or null", lambda v: v is None or v >= 1),
    "cluster.gpus_per_worker": Rule("a number >= 0 or null", lambda v: v is None or v >= 0),
    "cluster.max_retries": Rule("an integer >= 0", lambda v: v >= 0),
    "cluster.checkpoint_dir": _nonempty(
        "a folder path (shared by every node on a cluster) or null (<output_dir>/<sweep>/checkpoints)"),
    "tracking.experiment": _nonempty(),
    "tracking.artifact_location": _nonempty(),
    "tracking.register_as": Rule("a model name of letters, digits, '_', '-' and '.', or null",
                                 lambda v: v is None or bool(_NAME.match(v))),
    "sweep.name": Rule("a name of letters, digits, '_', '-' and '.'", lambda v: bool(_NAME.match(v))),
    "sweep.strategy": _choice(STRATEGIES),
    "sweep.num_trials": Rule("an integer >= 1 or null", lambda v: v is None or v >= 1),
    "sweep.scheduler": _choice(SCHEDULERS),
    "sweep.asha.rungs": Rule(
        "a non-empty increasing list of fractions of train.max_steps in (0, 1), e.g. [0.25, 0.5]",
        lambda v: bool(v) and all(0 < x < 1 for x in v)
        and all(a < b for a, b in zip(v, v[1:], strict=False))),
    "sweep.asha.eta": Rule("a number > 1 (past each rung the best 1/eta continue)", lambda v: v > 1),
    "sweep.optuna.startup_trials": Rule("an integer >= 0", lambda v: v >= 0),
    "sweep.optuna.batch_size": Rule("an integer >= 1 or null (every adapter slot)",
                                    lambda v: v is None or v >= 1),
    "seed": Rule("an integer >= 0", lambda v: v >= 0),
    "output_dir": _nonempty("a folder path"),
}
