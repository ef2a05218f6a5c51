"""What keys accept beyond their type: `Rule`s, and the rules several keys share.

A `Rule` reads after "must be" in an `error:` line (`allowed`) and checks a typed value (`ok`).
Each key's rule is declared on its schema field (`orchestrator.config.schema`); the engine's
own settings take theirs from `qlora.config.LIMITS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from qlora.config import LOFTQ_QUANT_TYPES

#: The keys population-based training may change (no shape depends on them): `qlora.exploit.MUTABLE`.
PBT_KEYS = ("train.learning_rate", "lora.dropout", "train.weight_decay")
#: Strategies that draw trials, and so take ranges {low, high} and need `sweep.num_trials`.
DRAWING = ("random", "optuna")
#: Per-trial keys that stay out of sweeps: they shape the shared base, not one adapter.
BASE_ONLY_TRAIN_KEYS = ("gradient_checkpointing", "activation_offload")
#: train.* keys that hold for the whole sweep: how often trials are checkpointed, fault injection.
SWEEP_WIDE_TRAIN_KEYS = ("checkpoint_every", "inject_oom_at_step")
RANGE_KEYS = ("low", "high", "log", "type")
DB_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's other SQLAlchemy backends
#: The metrics every evaluation logs; a user metric `eval.metric=pkg.mod:fn` adds `eval_fn`.
BUILTIN_OBJECTIVES = ("eval_loss", "eval_exact_match", "eval_token_f1")

#: Pairs of keys that say the same thing two ways: the first, when set, replaces the second (a
#: model file's max_steps or warmup_steps is a default); the user giving both is an error, and
#: the second set to null is not given (the first decides).
EXCLUSIVE = (("train.num_epochs", "train.max_steps", "null"),
             ("train.warmup_ratio", "train.warmup_steps", "0"))


def drop_null_seconds(data: dict) -> None:
    """Take out of the plain config `data` the second key of each `EXCLUSIVE` pair that is null
    while the first is set: null says "not given", so the schema's default stands (the first
    replaces it) instead of failing the second's type."""
    for first, second, _ in EXCLUSIVE:
        (s1, k1), (s2, k2) = first.split("."), second.split(".")
        one, two = data.get(s1), data.get(s2)
        if isinstance(one, dict) and one.get(k1) and isinstance(two, dict) and \
                k2 in two and two[k2] is None:
            del two[k2]


def loftq_error(quant_type: str, init: str) -> str | None:
    """Why `lora.init` cannot start on a `quant.type` base, or None: LoftQ fits the base's
    quantization error, and a 16-bit base has none (its adapter would start at zero, and a
    zero A and B never train)."""
    if init == "loftq" and quant_type not in LOFTQ_QUANT_TYPES:
        return (f"loftq needs a quantized base (quant.type one of {', '.join(LOFTQ_QUANT_TYPES)}); "
                f"quant.type={quant_type} has no quantization error to start from")
    return None


def is_uri(storage: str | None) -> bool:
    return storage is not None and "://" in storage and not storage.startswith("file://")


def storage_error(value: str | None, checkpoint_dir: str | None) -> str | None:
    """Why `value` cannot be a `cluster.storage` beside this `cluster.checkpoint_dir` (None: it
    can). Checked by `orchestrator.config.validate`."""
    if value is None:
        return None
    if checkpoint_dir is not None:
        return ("exclusive with cluster.checkpoint_dir: give one (cluster.storage puts "
                "checkpoints under <storage>/checkpoints)")
    if not is_uri(value):
        return None
    parsed = urlparse(value)
    if not parsed.scheme or not parsed.netloc:
        return f"{value!r} is not SCHEME://BUCKET[/PREFIX]"
    if "@" in parsed.netloc:
        return ("credentials do not belong in the URI (they would be logged): give them in the "
                "environment (AWS_ACCESS_KEY_ID, ...) or the library's config files")
    return None


@dataclass(frozen=True)
class Rule:
    """What a key accepts: `allowed` reads after "must be" in an error, `ok` tests a typed value."""

    allowed: str
    ok: Callable[[Any], bool] = lambda v: True


def choice(values: tuple[str, ...]) -> Rule:
    return Rule("one of " + ", ".join(values), lambda v: v in values)


def nonempty(noun: str = "a non-empty string") -> Rule:
    return Rule(noun, lambda v: bool(str(v).strip()))


def at_least(low: float, noun: str, note: str = "", optional: bool = False) -> Rule:
    """`noun >= low`, with `note` in parentheses and `or null` when None is allowed."""
    text = f"{noun} >= {low}" + (" or null" if optional else "") + (f" ({note})" if note else "")
    return Rule(text, lambda v: (optional and v is None) or (v is not None and v >= low))


_RAY_URL = re.compile(r"^(?:ray://)?[^\s:/]+:(\d{1,5})$")  # ray://HOST:PORT or Ray's HOST:PORT
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _ray_address_ok(v: str) -> bool:
    if v in ("local", "auto"):
        return True
    m = _RAY_URL.match(v)
    return bool(m) and 1 <= int(m.group(1)) <= 65535


ADDRESS = Rule("local, auto, HOST:PORT (the head's address, as `ray start` prints it) or "
               "ray://HOST:PORT (Ray Client)", _ray_address_ok)
METRIC_PATH = Rule("package.module:function or null",
                   lambda v: v is None or (v.count(":") == 1 and all(v.split(":"))))
MODEL_NAME = nonempty(
    "'tiny', smollm2_135m, a local folder, a .gguf file or a hub id such as org/name")
TARGET_MODULES = Rule(
    "'all-linear' or a non-empty list of module names such as [q_proj, v_proj]",
    lambda v: bool(v) and all(str(x).strip() for x in ([v] if isinstance(v, str) else v)),
)
RUNGS = Rule(
    "a non-empty increasing list of fractions of train.max_steps in (0, 1), e.g. [0.25, 0.5]",
    lambda v: bool(v) and all(0 < x < 1 for x in v)
    and all(a < b for a, b in zip(v, v[1:], strict=False)))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def parse_bytes(value) -> int | None:
    """A memory size as bytes: an integer, or a number with a unit ("2GiB", "512MB"); None stays
    None. Raises ValueError for anything else."""
    if value is None:
        return None
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f"not a memory size: {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _size_ok(value) -> bool:
    try:
        return value is None or parse_bytes(value) > 0
    except ValueError:
        return False


MEMORY_SIZE = Rule("a memory size per worker such as 2GiB, 512MB or a number of bytes, or null",
                   _size_ok)
