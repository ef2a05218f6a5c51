"""A trial's identity: its full config, its stable id, its seed and its short name.

`trial_id` hashes everything that affects a trial's numbers (model, data, quant, lora, train,
seed), so the same config has the same id in any sweep: that is what resume and MLflow's
`qlora.trial_id` tag rely on. `Trial` carries the config and the engine's specs built from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import Config
from qlora.config import BaseSpec, DataSpec, TrialSpec, stable_hash

#: train.* options that never change a trial's numbers: the shared base's memory options, how
#: often it is checkpointed, and the fault injection of tests (retries end with the same numbers).
_NOT_IN_ID = ("gradient_checkpointing", "activation_offload", "checkpoint_every",
              "inject_oom_at_step")
#: How a swept key (beyond r, alpha and lr, always shown) appears in a trial's name.
_SHORT = {
    "lora.dropout": "do", "lora.target_modules": "tm", "train.max_steps": "steps",
    "train.micro_batch_size": "mbs", "train.grad_accum_steps": "ga", "train.seq_len": "len",
    "train.weight_decay": "wd", "train.warmup_steps": "wu", "train.max_grad_norm": "clip",
    "train.eval_every": "ev", "train.optimizer": "", "train.lr_schedule": "", "seed": "s",
    "train.num_epochs": "ep", "train.warmup_ratio": "wr", "lora.use_rslora": "rs",
    "lora.rank_pattern": "rp", "lora.alpha_pattern": "ap", "lora.init": "",
    "lora.loftq_iter": "li", "quant.type": "", "quant.double_quant": "dq",
    "quant.compute_dtype": "",
}
#: Keys left out of a trial's id while at these defaults, so ids from before they existed hold.
_NEW_DEFAULTS = {"lora": {"use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                          "init": "gaussian", "loftq_iter": 1},
                 "train": {"num_epochs": None, "warmup_ratio": 0.0},
                 "data": {"mix": None, "name": None, "split": "train", "revision": None}}
_ALWAYS = ("lora.r", "lora.alpha", "train.learning_rate")
#: Significant digits kept of a randomly drawn float, so params and names stay readable.
DIGITS = 4
_NAME_DIGITS = 3  # names only need to tell trials apart; equal names get the id appended


@dataclass
class Trial:
    """One trial of a sweep, ready for the planner and the engine."""

    trial_id: str
    name: str
    params: dict  # the swept dotted keys -> this trial's values
    config: Config  # the full config with this trial's values applied
    spec: TrialSpec
    base: BaseSpec


def make_trial(config: Config, params: dict[str, Any], tid: str | None = None,
               taken: Collection[str] = ()) -> Trial:
    """The one way a `Trial` is built: its id, a readable name (with the id appended when the
    name is in `taken`), its engine seed, and the engine's specs from `config`."""
    tid = tid or trial_id(config)
    name = trial_name(config, params)
    if name in taken:
        name = f"{name}-{tid[:6]}"
    config = as_trained(config)
    spec = config.trial_spec(tid, name, trial_seed(config.seed, tid))
    return Trial(tid, name, params, config, spec, config.base_spec())


def as_trained(config: Config) -> Config:
    """`config` with the step counts its trial trains with: `train.max_steps` from
    `train.num_epochs` (counting the train split's rows, as the engine does) and
    `train.warmup_steps` from `train.warmup_ratio`, so what MLflow records is what ran."""
    spec = config.trial_spec("", "", 0)
    if spec.num_epochs is not None:
        spec = spec.resolved(train_rows(config.base_spec(), spec.data))
    values = {k: v for k, v in (("train.max_steps", spec.max_steps),
                                ("train.warmup_steps", spec.warmup))
              if getattr(config.train, k.split(".")[1]) != v}
    return apply(config, values) if values else config


@functools.lru_cache(maxsize=16)
def train_rows(base: BaseSpec, data: DataSpec) -> int:
    """How many rows the train split of `data` has under `base`'s tokenizer (the tokenized data
    is cached on disk, so the workers do not tokenize it again)."""
    from qlora.base import load_tokenizer
    from qlora.data import DataError, load_data

    try:
        return len(load_data(data, load_tokenizer(base)).train)
    except DataError as e:
        raise ConfigError("data.path", str(e)) from None


def set_values(trial: Trial, values: dict[str, Any]) -> None:
    """Set dotted keys of a trial that the search decides (ASHA's evaluation cadence), in its
    config and its spec together, so what MLflow records is what the worker trains with.

    The trial keeps its id and name: they are those of the trial as the sweep asked for it.
    """
    trial.config = apply(trial.config, values)
    trial.spec = trial.config.trial_spec(trial.trial_id, trial.name, trial.spec.seed)


def snap(value: float, spec: dict[str, Any]) -> int | float:
    """A sampled number made readable and kept in its range `{low, high, type}`: rounded to an
    integer or to `DIGITS` significant digits, then clamped (rounding may step just outside)."""
    low, high = spec["low"], spec["high"]
    value = round(value) if spec["type"] == "int" else float(f"{value:.{DIGITS}g}")
    return type(low)(min(max(value, low), high))


def apply(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of `cfg` with the dotted keys of `params` set (`lora.r`, `train.learning_rate`, `seed`)."""
    for key, value in params.items():
        section, _, leaf = key.rpartition(".")
        if section:
            part = dataclasses.replace(getattr(cfg, section), **{leaf: value})
            cfg = dataclasses.replace(cfg, **{section: part})
        else:
            cfg = dataclasses.replace(cfg, **{leaf: value})
    return cfg


def trial_id(cfg: Config) -> str:
    """The stable hash of what decides a trial's numbers: model, data, quant, lora, train, seed.

    Where it runs (pack, cluster), where it is recorded (tracking), which sweep asked for it,
    the base's memory options and checkpointing do not enter, so the same trial has the same id
    in any sweep.
    """
    data = dataclasses.asdict(cfg.data)
    for key in ("path", "eval_path"):
        if data[key] is not None and "://" not in data[key]:
            data[key] = os.path.normpath(data[key])  # ./a.jsonl and a.jsonl are one file
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _NOT_IN_ID}
    if train["num_epochs"] is not None:
        train.pop("max_steps")  # the epochs decide the steps
    if train["warmup_ratio"]:
        train.pop("warmup_steps")
    lora = dataclasses.asdict(cfg.lora)
    for section, values in (("lora", lora), ("train", train), ("data", data)):
        for key, default in _NEW_DEFAULTS[section].items():
            if values.get(key, default) == default:
                values.pop(key, None)
    if not isinstance(lora["target_modules"], str):
        lora["target_modules"] = list(lora["target_modules"])
    return stable_hash({
        "model": dataclasses.asdict(cfg.model), "data": data, "quant": dataclasses.asdict(cfg.quant),
        "lora": lora, "train": train, "seed": cfg.seed,
    })


def trial_seed(seed: int, tid: str) -> int:
    """The engine seed of a trial: its init, dropout and data order depend on nothing else."""
    return int(stable_hash([seed, tid]), 16) % 2**31


def trial_name(cfg: Config, params: dict[str, Any]) -> str:
    """A readable name such as `r16-a32-lr2e-4`, then any other swept values (`-do0.1`, `-s3`)."""
    parts = [f"r{cfg.lora.r}", f"a{fmt_number(cfg.lora.alpha, _NAME_DIGITS)}",
             f"lr{fmt_number(cfg.train.learning_rate, _NAME_DIGITS)}"]
    for key, value in params.items():
        if key in _ALWAYS:
            continue
        short = _SHORT.get(key, key.rpartition(".")[2])
        if isinstance(value, list | tuple):
            value = "+".join(map(str, value))
        elif isinstance(value, dict):  # module patterns: regular expressions, not name material
            value = stable_hash(value, 6)
        shown = fmt_number(value, _NAME_DIGITS) if isinstance(value, float) else value
        parts.append(f"{short}{shown}")
    return "-".join(parts)


def fmt_number(x: float | int, digits: int = DIGITS) -> str:
    """A short stable form: 32.0 -> '32', 0.05 -> '0.05', 0.0002 -> '2e-4', 1.5e-05 -> '1.5e-5'.

    At most `digits` significant digits are shown.
    """
    if isinstance(x, int) or (math.isfinite(x) and float(x).is_integer() and abs(x) < 1e6):
        return str(int(x))
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e6):
        mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    return f"{x:.{digits}g}"


def pack_key(base: BaseSpec, seq_len: int) -> str:
    """Which trials may share a pack: the same frozen weights under the same memory options
    (the whole BaseSpec, so trials differing only in gradient checkpointing or offload do not
    run under the other's setting) and the same sequence length (one batch shape per pack)."""
    return stable_hash([asdict(base), seq_len], 16)
