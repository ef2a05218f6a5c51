"""The edge: a composed config (Hydra's DictConfig or a plain dict) in, a typed `Config` out.

Every key is checked once, here: unknown keys (with the nearest known ones), types, ranges and
allowed values, and a sweep's per-trial values against the same rules as the keys they vary;
missing keys take the schema's defaults. Anything wrong raises `ConfigError(key, message)`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from orchestrator.cluster.storage import config_error as storage_error
from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import (
    BASE_ONLY_TRAIN_KEYS,
    DB_SCHEMES,
    DRAWING,
    EXCLUSIVE,
    RANGE_KEYS,
    SWEEP_WIDE_TRAIN_KEYS,
    Rule,
    drop_null_seconds,
)
from orchestrator.config.schema import Config, SweepDef


def validate(cfg: Any) -> Config:
    """The typed `Config` of a composed config (DictConfig or dict), or `ConfigError` naming the key.

    The returned sweep's `params` are normalized: dotted trial keys in the order given, each to a
    list of values or (random search) `{low, high, log, type}`.
    """
    data = _plain(cfg)
    data.pop("hydra", None)  # Hydra's own node, present when composed with return_hydra_config
    drop_null_seconds(data)
    config = _build(Config, data, "")
    _check_tracking_uri(config.tracking.uri)
    config.sweep.params = sweep_params(config.sweep)
    _check_exclusive_sweep(config)
    _check_eval(config)
    if why := storage_error(config.cluster.storage, config.cluster.checkpoint_dir):
        raise ConfigError("cluster.storage", why)
    if config.sweep.strategy in DRAWING and config.sweep.num_trials is None:
        raise ConfigError("sweep.num_trials", f"must be an integer >= 1 for strategy "
                                              f"{config.sweep.strategy}, got null")
    return config


_UNSET = ("null", "none", "0", "0.0", "")


def check_overrides(overrides: list[str]) -> None:
    """`ConfigError` when the command line sets both keys of an `EXCLUSIVE` pair."""
    given = {}
    for override in overrides:
        key, eq, value = override.partition("=")
        if eq and not key.startswith("~"):
            given[key.lstrip("+")] = value.strip().lower()
    for first, second, unset in EXCLUSIVE:
        if given.get(first, "null") not in _UNSET and given.get(second, "null") != "null":
            raise ConfigError(first, f"exclusive with {second}: give one of them ({first} "
                                     f"replaces the {second} a model file sets; {first}={unset} "
                                     f"leaves it to {second})")


def _check_exclusive_sweep(config: Config) -> None:
    """A sweep that varies the second key of an `EXCLUSIVE` pair while the first is set (or
    varied too) would train none of the values it lists."""
    params = config.sweep.params
    for first, second, _ in EXCLUSIVE:
        section, _, leaf = first.partition(".")
        if second in params and (first in params or getattr(getattr(config, section), leaf)):
            raise ConfigError(f"sweep.params.{second}", f"exclusive with {first}, which is "
                                                        f"{'varied' if first in params else 'set'}"
                                                        f": vary one of them")


def check_value(key: str, value: Any, label: str | None = None) -> Any:
    """`value` typed and range-checked as the dotted `key` requires; errors name `label` or `key`."""
    section, _, leaf = key.rpartition(".")
    cls = _section_class(section)
    hints = typing.get_type_hints(cls)
    if leaf not in hints:
        raise unknown_key(key)
    return _field(label or key, key, value, hints[leaf])


def unknown_key(key: str) -> ConfigError:
    """The error for a key the schema does not have, listing the known keys beside it."""
    parts = key.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        here, section = ".".join(parts[: i + 1]), ".".join(parts[:i])
        hints = typing.get_type_hints(cls)
        if part not in hints:
            known = [f.name for f in dataclasses.fields(cls)]
            where = f"under {section}" if section else "at the top level"
            message = f"unknown key; known keys {where}: {', '.join(known)}"
            near = difflib.get_close_matches(part, known, n=2, cutoff=0.6)
            if near:
                message += f" (did you mean {' or '.join(near)}?)"
            return ConfigError(here, message)
        cls = hints[part]
        if i < len(parts) - 1 and not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return ConfigError(key, f"{here} is a single value, not a section of keys")
    return ConfigError(key, "not a key that can be set here")


# --- helpers -----------------------------------------------------------------------------------


def _plain(cfg: Any) -> dict:
    """A deep plain-dict copy, with interpolations resolved and missing values reported by key."""
    if isinstance(cfg, Mapping) and not _is_omegaconf(cfg):
        return copy.deepcopy(dict(cfg))
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = e.full_key or "?"
        raise ConfigError(key, f"required: no value was given (set {key}=...)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(e.full_key or "?", str(e).splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError("?", f"the config must be a mapping of keys, got {_show(data)}")
    return data


def _is_omegaconf(obj: Any) -> bool:
    return type(obj).__module__.startswith("omegaconf")


def _section_class(section: str) -> type:
    cls: Any = Config
    for part in section.split(".") if section else []:
        cls = typing.get_type_hints(cls).get(part)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise unknown_key(section)
    return cls


def _build(cls: type, data: Any, prefix: str) -> Any:
    """An instance of the dataclass `cls` from `data`, checking every key under `prefix`."""
    section = prefix.rstrip(".")
    if not isinstance(data, Mapping):
        raise ConfigError(section, f"must be a section of keys, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in hints:
            raise unknown_key(f"{prefix}{key}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue  # the schema's default
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[f.name] = _build(hint, data[f.name], key + ".")
        else:
            values[f.name] = _field(key, key, data[f.name], hint)
    return cls(**values)


def _field(label: str, key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the type `hint` and checked against `key`'s rule."""
    rule = rule_of(key)
    allowed = rule.allowed if rule else _noun(hint)
    try:
        typed = _convert(value, hint)
    except (TypeError, ValueError):
        raise ConfigError(label, f"must be {allowed}, got {_show(value)}") from None
    if typed is not None and rule and not rule.ok(typed):
        raise ConfigError(label, f"must be {allowed}, got {_show(value)}")
    return typed


def rule_of(key: str) -> Rule | None:
    """The rule declared on the schema field of the dotted `key` (None: any value of its type)."""
    section, _, leaf = key.rpartition(".")
    for f in dataclasses.fields(_section_class(section)):
        if f.name == leaf:
            return f.metadata.get("rule")
    return None


def _accepts_none(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _convert(value: Any, hint: Any) -> Any:
    """`value` as `hint` (int, float, bool, str, dict, list[str], unions of them); else ValueError."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            if type(None) in args:
                return None
            raise ValueError("null")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg)
            except (TypeError, ValueError):
                pass
        raise ValueError(value)
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ValueError(value)
        return [_convert(v, args[0]) for v in value] if args else list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(value)
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 1e3 from the command line is a float
        raise ValueError(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(value)
        if not math.isfinite(value):
            raise ValueError(value)
        return float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `tracking.experiment=2024` parses as an int
        raise ValueError(value)
    if hint is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(value)
    raise TypeError(f"unsupported schema type {hint!r}")


def _noun(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             dict: "a mapping"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union):
        text = " or ".join(_noun(a) for a in args)
        return text + (" or null" if _accepts_none(hint) else "")
    if typing.get_origin(hint) is list:
        return "a list"
    return names.get(hint, str(hint))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_eval(config: Config) -> None:
    """The user metric imports and is callable; the objective is a metric the trials log."""
    from orchestrator.search.objective import BUILTIN_OBJECTIVES
    from qlora.metrics import load_metric, metric_name

    known = list(BUILTIN_OBJECTIVES)
    if config.eval.metric is not None:
        try:
            load_metric(config.eval.metric)
        except ValueError as e:
            raise ConfigError("eval.metric", str(e)) from None
        known.append(f"eval_{metric_name(config.eval.metric)}")
    if config.sweep.objective not in known:
        raise ConfigError("sweep.objective", f"must be one of {', '.join(known)} (the metrics "
                                             f"each evaluation logs), got {config.sweep.objective!r}")
    if config.sweep.objective != "eval_loss" and config.eval.num_samples == 0:
        raise ConfigError("sweep.objective", f"{config.sweep.objective} needs generated answers; "
                                             "set eval.num_samples >= 1, or use eval_loss")


def _check_tracking_uri(uri: str) -> None:
    key = "tracking.uri"
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme == "file" or not scheme or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
        raise ConfigError(
            key,
            f"{uri!r} is a file store, which MLflow 3 refuses; use sqlite:///mlflow.db "
            "(a local database) or http(s)://HOST:PORT (an MLflow server)",
        )
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri) <= len("sqlite:///"):
            raise ConfigError(key, f"must be sqlite:///PATH (three slashes, then a file), got {uri!r}")
        return
    if scheme in ("http", "https"):
        if not re.match(r"^https?://[^\s/:]+(:\d{1,5})?(/\S*)?$", uri):
            raise ConfigError(key, f"must be http(s)://HOST[:PORT][/PATH], got {uri!r}")
        return
    if scheme.split("+")[0] in DB_SCHEMES:
        return
    raise ConfigError(
        key,
        f"must be sqlite:///PATH, http(s)://HOST:PORT or a database URL "
        f"({', '.join(s + '://...' for s in DB_SCHEMES)}), got {uri!r}",
    )

def sweepable_keys() -> list[str]:
    """The dotted keys a sweep may vary per trial: lora.*, quant.* (trials on other bases go to
    other packs), data.*, train.* but the base's memory options, seed."""
    keys = [f"lora.{f.name}" for f in dataclasses.fields(_section_class("lora"))]
    keys += [f"quant.{f.name}" for f in dataclasses.fields(_section_class("quant"))]
    # A trial may train on its own data: one pack can hold adapters for different tasks.
    keys += [f"data.{f.name}" for f in dataclasses.fields(_section_class("data"))]
    keys += [
        f"train.{f.name}" for f in dataclasses.fields(_section_class("train"))
        if f.name not in BASE_ONLY_TRAIN_KEYS + SWEEP_WIDE_TRAIN_KEYS
    ]
    return keys + ["seed"]


def sweep_params(sweep: SweepDef) -> dict[str, Any]:
    """A sweep's `params` checked and normalized (dotted keys, lists or range dicts)."""
    out: dict[str, Any] = {}
    allowed = sweepable_keys()
    for key, spec in _flatten(sweep.params).items():
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
            raise ConfigError(label, f"must be {shape}, got {_show(spec)}")
    return out


def _flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested sections (`{lora: {r: [...]}}`, as `+sweep.params.lora.r=...` makes) to dotted keys.

    A key given both ways keeps its first position and the value given last.
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        is_range = isinstance(value, Mapping) and any(k in value for k in ("low", "high"))
        if isinstance(value, Mapping) and not is_range and "." not in str(key):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _range(key: str, label: str, spec: Mapping) -> dict[str, Any]:
    """A random-search range `{low, high, log, type}` checked against `key`'s own rule."""
    extra = [k for k in spec if k not in RANGE_KEYS]
    if extra:
        raise ConfigError(f"{label}.{extra[0]}", f"unknown key; a range has {', '.join(RANGE_KEYS)}")
    for k in ("low", "high"):
        if k not in spec:
            raise ConfigError(label, f"a range needs both low and high, got {_show(dict(spec))}")
    section, _, leaf = key.rpartition(".")
    hint = typing.get_type_hints(_section_class(section))[leaf]
    if hint not in (int, float):
        raise ConfigError(label, "a range {low, high} needs a numeric key; give a list of values")
    kind = spec.get("type", "int" if hint is int else "float")
    if kind not in ("int", "float") or (hint is int and kind == "float"):
        choices = "int" if hint is int else "int or float"
        raise ConfigError(f"{label}.type", f"must be {choices}, got {_show(kind)}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{label}.log", f"must be true or false, got {_show(log)}")
    low = check_value(key, spec["low"], f"{label}.low")
    high = check_value(key, spec["high"], f"{label}.high")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise ConfigError(label, f"an int range needs whole low and high, got {low} and {high}")
    if low > high:
        raise ConfigError(label, f"low must be <= high, got low={low} high={high}")
    if log and low <= 0:
        raise ConfigError(f"{label}.low", f"a log range needs low > 0, got {low}")
    return {"low": low, "high": high, "log": log, "type": kind}
