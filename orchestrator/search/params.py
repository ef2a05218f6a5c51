"""A sweep's `params` checked and normalized: the keys a sweep may vary per trial, and their values.

Each key must be a per-trial key (`sweepable_keys`); a list's values are checked against the rule
of the key they vary, and a range `{low, high, log, type}` (random search and Optuna) against the
key's type. The result maps dotted keys, in the order given, to a list of values or a full range
dict. Normalizing twice gives the same result, so whoever reads `params` may call it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any

from orchestrator.config.coerce import check_value, flatten, section_class, show
from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import (
    BASE_ONLY_TRAIN_KEYS,
    DRAWING,
    RANGE_KEYS,
    SWEEP_WIDE_TRAIN_KEYS,
)
from orchestrator.config.schema import Config, SweepDef


def normalize(config: Config) -> Config:
    """`config` with its sweep's `params` checked and normalized (in place; returned)."""
    config.sweep.params = sweep_params(config.sweep)
    return config


def sweepable_keys() -> list[str]:
    """The dotted keys a sweep may vary per trial: lora.*, quant.* (trials on other bases go to
    other packs), data.*, train.* but the base's memory options, seed."""
    keys = [f"lora.{f.name}" for f in dataclasses.fields(section_class("lora"))]
    keys += [f"quant.{f.name}" for f in dataclasses.fields(section_class("quant"))]
    # A trial may train on its own data: one pack can hold adapters for different tasks.
    keys += [f"data.{f.name}" for f in dataclasses.fields(section_class("data"))]
    keys += [
        f"train.{f.name}" for f in dataclasses.fields(section_class("train"))
        if f.name not in BASE_ONLY_TRAIN_KEYS + SWEEP_WIDE_TRAIN_KEYS
    ]
    return keys + ["seed"]


def sweep_params(sweep: SweepDef) -> dict[str, Any]:
    """A sweep's `params` checked and normalized (dotted keys, lists or range dicts)."""
    out: dict[str, Any] = {}
    allowed = sweepable_keys()
    for key, spec in flatten(sweep.params).items():
        label = f"sweep.params.{key}"
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ConfigError(
                label, f"not a per-trial key{hint}; a sweep may vary: {', '.join(allowed)}"
            )
        if isinstance(spec, Mapping):
            if sweep.strategy not in DRAWING:
                raise ConfigError(label, "a range {low, high} needs strategy random or optuna; "
                                         "a grid takes a list of values")
            out[key] = _range(key, label, spec)
        elif isinstance(spec, list | tuple) and len(spec) > 0:
            out[key] = [check_value(key, v, label) for v in spec]
        else:
            shape = "a non-empty list of values"
            if sweep.strategy in DRAWING:
                shape += " or a range {low, high, log, type}"
            raise ConfigError(label, f"must be {shape}, got {show(spec)}")
    return out


def _range(key: str, label: str, spec: Mapping) -> dict[str, Any]:
    """A random-search range `{low, high, log, type}` checked against `key`'s own rule."""
    extra = [k for k in spec if k not in RANGE_KEYS]
    if extra:
        raise ConfigError(f"{label}.{extra[0]}", f"unknown key; a range has {', '.join(RANGE_KEYS)}")
    for k in ("low", "high"):
        if k not in spec:
            raise ConfigError(label, f"a range needs both low and high, got {show(dict(spec))}")
    section, _, leaf = key.rpartition(".")
    hint = typing.get_type_hints(section_class(section))[leaf]
    if hint not in (int, float):
        raise ConfigError(label, "a range {low, high} needs a numeric key; give a list of values")
    kind = spec.get("type", "int" if hint is int else "float")
    if kind not in ("int", "float") or (hint is int and kind == "float"):
        choices = "int" if hint is int else "int or float"
        raise ConfigError(f"{label}.type", f"must be {choices}, got {show(kind)}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{label}.log", f"must be true or false, got {show(log)}")
    low = check_value(key, spec["low"], f"{label}.low")
    high = check_value(key, spec["high"], f"{label}.high")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise ConfigError(label, f"an int range needs whole low and high, got {low} and {high}")
    if low > high:
        raise ConfigError(label, f"low must be <= high, got low={low} high={high}")
    if log and low <= 0:
        raise ConfigError(f"{label}.low", f"a log range needs low > 0, got {low}")
    return {"low": low, "high": high, "log": log, "type": kind}
