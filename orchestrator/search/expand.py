"""A sweep's trials: the grid or the random draws of `cfg.sweep`, each a full config and its specs.

- grid   : the cartesian product of the value lists, in the YAML's order (the last key fastest).
- random : `num_trials` draws from `random.Random(cfg.seed)`: a list gives a uniform choice, a
           range `{low, high, log, type}` a uniform (or log-uniform) number, rounded for `int`.
- optuna : the first round of Optuna's proposals (`orchestrator.search.optuna_rounds`); the sweep asks
           for the rest as results come in.

Either way trials are deduplicated by `trial_id`, the hash of everything that affects a trial's
numbers (model, data, quant, lora, train, seed), so the same config has the same id in any sweep:
that is what resume and MLflow's `qlora.trial_id` tag rely on.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from orchestrator.config.errors import ConfigError
from orchestrator.config.rules import loftq_error
from orchestrator.config.schema import Config
from orchestrator.search.params import sweep_params
from orchestrator.search.trials import (
    Trial,
    apply,
    fmt_number,
    make_trial,
    snap,
    trial_id,
    trial_name,
)


def expand(cfg: Config) -> list[Trial]:
    """The trials of `cfg.sweep`, in a stable order; a config validated by `validate()`.

    A sweep without params gives one trial: `cfg` itself. Params are checked again (cheap), so
    a config built by hand gets the same `ConfigError` as one from the command line. Combinations
    no trial can train (LoftQ on a 16-bit base) are left out: `skipped` says which.
    """
    if cfg.sweep.strategy == "optuna":
        # Later rounds follow from results: what can be listed up front is the first round.
        from orchestrator.search.optuna_rounds import first_round

        return first_round(cfg)
    combos, left_out = _split(cfg, _combos(cfg))
    if left_out and not combos:
        if not {"lora.init", "quant.type"} & set(cfg.sweep.params):
            raise ConfigError("lora.init", left_out[0].partition(": ")[2])
        raise ConfigError("sweep.params", f"no combination can train: {left_out[0]}")

    seen: set[str] = set()
    drafts: list[tuple[str, dict, Config]] = []
    for params in combos:
        config = apply(cfg, params)
        tid = trial_id(config)
        if tid not in seen:
            seen.add(tid)
            drafts.append((tid, params, config))

    names = [trial_name(config, params) for _, params, config in drafts]
    twins = {n for n in names if names.count(n) > 1}
    return [make_trial(config, params, tid, taken=twins) for tid, params, config in drafts]


def first_workers(cfg: Config) -> int:
    """How many workers the sweep's first packs can keep busy (a pack per `pack.max_adapters`
    trials), for the workers created while the driver sets up (`start_connect`); 0 if unknown."""
    try:
        if cfg.sweep.strategy == "optuna":
            n = cfg.sweep.num_trials or 1
        else:
            n = len(_combos(cfg))
    except Exception:  # noqa: BLE001 - params not checked yet: they fail where they are checked
        return 0
    return max(1, math.ceil(n / max(1, cfg.pack.max_adapters)))


def _combos(cfg: Config) -> list[dict[str, Any]]:
    """The swept values of each trial of a grid or random sweep, in order."""
    sweep = cfg.sweep
    params = sweep_params(sweep)
    if sweep.strategy == "grid":
        product = itertools.product(*params.values())
        return [dict(zip(params, values, strict=True)) for values in product]
    if sweep.strategy == "random":
        rng = random.Random(cfg.seed)
        return [{key: _draw(rng, spec) for key, spec in params.items()}
                for _ in range(sweep.num_trials or 1)]
    raise ValueError(f"unknown sweep strategy {sweep.strategy!r}")


def _split(cfg: Config, combos: list[dict]) -> tuple[list[dict], list[str]]:
    """(the combinations a trial can train, a line for each one left out and why)."""
    kept, skipped_ = [], []
    for params in combos:
        config = apply(cfg, params)
        why = loftq_error(config.quant.type, config.lora.init)
        if why is None:
            kept.append(params)
        else:
            shown = ", ".join(f"{k}={v}" for k, v in params.items()
                              if k in ("lora.init", "quant.type"))
            skipped_.append(f"{shown or 'lora.init=' + config.lora.init}: {why}")
    return kept, skipped_


def skipped(cfg: Config) -> list[str]:
    """A line for each combination of a grid or random sweep that `expand` leaves out."""
    if cfg.sweep.strategy == "optuna":
        return []
    return list(dict.fromkeys(_split(cfg, _combos(cfg))[1]))


def _draw(rng: random.Random, spec: Any) -> Any:
    """One value of a random-search param: a list's element, or a number within a range."""
    if isinstance(spec, list):
        return rng.choice(spec)
    low, high = spec["low"], spec["high"]
    if spec["log"]:
        return snap(math.exp(rng.uniform(math.log(low), math.log(high))), spec)
    return snap(rng.uniform(low, high), spec)


def format_trials(cfg: Config, trials: list[Trial]) -> str:
    """A plain-text table of `trials` under one line describing the sweep (for dry runs and logs).
    The steps are those the trials train (`train.num_epochs` resolved on the train split, as the
    worker does), not the config's `train.max_steps`, which epochs replace; a range where
    trials differ."""
    swept = list(cfg.sweep.params)
    steps = sorted({t.spec.max_steps for t in trials}) or [cfg.train.max_steps]
    shown = f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
    head = (f"sweep {cfg.sweep.name} ({cfg.sweep.strategy}): {len(trials)} trial"
            f"{'' if len(trials) == 1 else 's'} on {cfg.model.name_or_path} "
            f"({cfg.quant.type}, {cfg.quant.compute_dtype}), data {cfg.data.path or 'bundled'}, "
            f"{shown} steps, up to {cfg.pack.max_adapters} per pack")
    rows = [["#", "trial_id", "name", *swept]]
    for i, t in enumerate(trials, 1):
        values = [fmt_number(t.params[k]) if isinstance(t.params[k], float) else str(t.params[k])
                  for k in swept]
        rows.append([str(i), t.trial_id, t.name, *values])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join([head, *lines])
