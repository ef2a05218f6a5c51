"""The rules between keys of a typed `Config`, checked after `coerce` typed each key alone.

`validate(cfg)` is the edge: a composed config in, a typed `Config` out (`orchestrator.config.coerce`),
then what no single key can say: the tracking URI's form, pairs of keys that say the same thing
two ways, the evaluation metric and the objective, `cluster.storage` beside `checkpoint_dir`, a
budget for drawing strategies. Anything wrong raises `ConfigError(key, message)`. A sweep's
`params` leave here flattened to dotted keys; `orchestrator.search.params` checks their values.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.config.coerce import coerce
from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import (
    BUILTIN_OBJECTIVES,
    DB_SCHEMES,
    DRAWING,
    EXCLUSIVE,
    storage_error,
)
from orchestrator.config.schema import Config


def validate(cfg: Any) -> Config:
    """The typed `Config` of a composed config (DictConfig or dict), or `ConfigError` naming the key.

    The returned sweep's `params` have dotted keys in the order given; their values are checked
    by `orchestrator.search.params.normalize` (the preflight calls it).
    """
    config = coerce(cfg)
    _check_tracking_uri(config.tracking.uri)
    _check_exclusive_sweep(config)
    _check_eval(config)
    _check_mix(config)
    if why := storage_error(config.cluster.storage, config.cluster.checkpoint_dir):
        raise ConfigError("cluster.storage", why)
    if config.sweep.strategy in DRAWING and config.sweep.num_trials is None:
        raise ConfigError("sweep.num_trials", f"must be an integer >= 1 for strategy "
                                              f"{config.sweep.strategy}, got null")
    return config


def _check_mix(config: Config) -> None:
    """`data.mix`: 2 or more well-formed sources, and not beside `data.path` / `data.eval_path`
    (each source holds out its own eval split)."""
    from qlora.config import mix_error

    mix = config.data.mix
    if mix is None:
        return
    if why := mix_error(mix):
        raise ConfigError("data.mix", f"{why}; each entry is {{path, weight}} (weight > 0; also "
                                      "label, name, split, revision, format)")
    for key in ("path", "eval_path"):
        if getattr(config.data, key) is not None:
            raise ConfigError("data.mix", f"exclusive with data.{key}: a mixture names its "
                                          "sources in its entries (use data=bundled with it)")


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


def _check_eval(config: Config) -> None:
    """The user metric imports and is callable; the objective is a metric the trials log."""
    from qlora.metrics import load_metric, metric_name

    known = list(BUILTIN_OBJECTIVES)
    if config.eval.metric is not None:
        try:
            fn = load_metric(config.eval.metric)
        except ValueError as e:
            raise ConfigError("eval.metric", str(e)) from None
        _try_metric(config.eval.metric, fn)
        logged = f"eval_{metric_name(config.eval.metric)}"
        if logged in BUILTIN_OBJECTIVES:
            raise ConfigError("eval.metric", f"{config.eval.metric!r} would log {logged} over the "
                                             f"built-in one; name the function otherwise (not "
                                             f"{', '.join(m[5:] for m in BUILTIN_OBJECTIVES)})")
        known.append(logged)
    if config.sweep.objective not in known:
        raise ConfigError("sweep.objective", f"must be one of {', '.join(known)} (the metrics "
                                             f"each evaluation logs), got {config.sweep.objective!r}")
    if config.sweep.objective != "eval_loss" and config.eval.num_samples == 0:
        raise ConfigError("sweep.objective", f"{config.sweep.objective} needs generated answers; "
                                             "set eval.num_samples >= 1, or use eval_loss")


def _try_metric(path: str, fn) -> None:
    """Call a user metric once, as evaluation will: (prediction, reference) -> a number. One that
    raises or answers otherwise would fail its trials after they trained."""
    try:
        value = fn("the cat sat", "the cat sat")
    except Exception as e:
        raise ConfigError("eval.metric", f"{path}('the cat sat', 'the cat sat') raised "
                                         f"{type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError("eval.metric", f"{path} must return a number (a float per answer), "
                                         f"returned {type(value).__name__} {value!r:.40}")


def masked(uri: str) -> str:
    """`uri` with the password of its user part (`scheme://user:PASSWORD@host`) as `***`."""
    return re.sub(r"^([A-Za-z][\w+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", uri)


def _check_tracking_uri(uri: str) -> None:
    key = "tracking.uri"
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    userinfo = re.match(r"^[A-Za-z][\w+.-]*://([^/@]*)@", uri)
    if userinfo and (":" in userinfo.group(1) or scheme in ("http", "https")):
        where = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                 if scheme in ("http", "https") else
                 "the database's own settings (PGPASSWORD or ~/.pgpass, MYSQL_PWD, ...), with "
                 "only the user in the URI")
        raise ConfigError(key, f"{masked(uri)}: credentials do not belong in the URI (it is "
                               f"printed, logged and recorded); give them in {where}")
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
