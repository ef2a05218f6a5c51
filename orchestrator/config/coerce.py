"""A composed config (Hydra's DictConfig or a plain dict) in, the typed `Config` dataclasses out.

Every key is checked once, here: unknown keys (with the nearest known ones), types, ranges and
allowed values (each schema field's `Rule`); missing keys take the schema's defaults. Anything
wrong raises `ConfigError(key, message)`. Rules between keys are `orchestrator.config.validate`'s;
a sweep's `params` are only flattened to dotted keys here, and checked against the keys they vary
by `orchestrator.search.params`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import Rule, drop_null_seconds
from orchestrator.config.schema import Config


def coerce(cfg: Any) -> Config:
    """The typed `Config` of a composed config, or `ConfigError` naming the key; the sweep's
    `params` flattened to dotted keys (`{lora: {r: [...]}}` -> `{"lora.r": [...]}`)."""
    data = _plain(cfg)
    data.pop("hydra", None)  # Hydra's own node, present when composed with return_hydra_config
    drop_null_seconds(data)  # `train.max_steps=null` beside `train.num_epochs`: not given
    config = _build(Config, data, "")
    config.sweep.params = flatten(config.sweep.params)
    return config


def check_value(key: str, value: Any, label: str | None = None) -> Any:
    """`value` typed and range-checked as the dotted `key` requires; errors name `label` or `key`."""
    section, _, leaf = key.rpartition(".")
    cls = section_class(section)
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
        raise ConfigError("?", f"the config must be a mapping of keys, got {show(data)}")
    return data


def _is_omegaconf(obj: Any) -> bool:
    return type(obj).__module__.startswith("omegaconf")


def section_class(section: str) -> type:
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
        raise ConfigError(section, f"must be a section of keys, got {show(data)}")
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
        raise ConfigError(label, f"must be {allowed}, got {show(value)}") from None
    if typed is not None and rule and not rule.ok(typed):
        raise ConfigError(label, f"must be {allowed}, got {show(value)}")
    return typed


def rule_of(key: str) -> Rule | None:
    """The rule declared on the schema field of the dotted `key` (None: any value of its type)."""
    section, _, leaf = key.rpartition(".")
    for f in dataclasses.fields(section_class(section)):
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


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def flatten(params: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested sections (`{lora: {r: [...]}}`, as `+sweep.params.lora.r=...` makes) to dotted keys.

    A key given both ways keeps its first position and the value given last.
    """
    out: dict[str, Any] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        is_range = isinstance(value, Mapping) and any(k in value for k in ("low", "high"))
        if isinstance(value, Mapping) and not is_range and "." not in str(key):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out
