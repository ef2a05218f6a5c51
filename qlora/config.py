"""Typed specifications the engine works from.

The engine receives plain frozen dataclasses, never dicts or OmegaConf nodes. The orchestrator
validates user input at the edge and builds these; library users build them directly.

- `BaseSpec`  : what the shared frozen base is (model, quantization, memory options). Trials with
                equal `BaseSpec.fingerprint()` may share one loaded base.
- `DataSpec`  : where a trial's examples come from and how they are tokenized.
- `TrialSpec` : one adapter and how it is trained. Its `seed` drives the adapter's init, dropout
                masks and data order, so a trial's numbers do not depend on its pack.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

QUANT_TYPES = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")
LR_SCHEDULES = ("cosine", "linear", "constant")
DATA_FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "text")
DATA_PACKING = ("none", "pack")
#: How an adapter starts: PEFT's default (A Kaiming-uniform, B zero) or LoftQ's (see qlora.loftq).
LORA_INITS = ("gaussian", "loftq")
#: The storage types whose quantization error LoftQ fits; a 16-bit base ("none") has none.
LOFTQ_QUANT_TYPES = ("nf4", "fp4", "int8")

#: The model built locally from a config (see `qlora.tiny`), never downloaded.
TINY = "tiny"
#: Label of tokens that take no loss (prompt, padding): PyTorch's cross-entropy ignore_index.
IGNORE = -100


@dataclass(frozen=True)
class Limit:
    """What one engine setting accepts; the orchestrator's `error:` lines read `allowed`."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself excluded
    open_high: bool = False
    integer: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed too

    def ok(self, value) -> bool:
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))

    @property
    def allowed(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.choices:
            text = "one of " + ", ".join(self.choices)
        else:
            noun = "an integer" if self.integer else "a number"
            if self.low is not None and self.low == self.high:
                text = num(self.low)
            elif self.low is not None and self.high is not None:
                if self.integer:
                    text = f"{noun} in {num(self.low)}..{num(self.high)}"
                else:
                    text = (f"{noun} in {'(' if self.open_low else '['}{num(self.low)}, "
                            f"{num(self.high)}{')' if self.open_high else ']'}")
            elif self.low is not None:
                text = f"{noun} {'>' if self.open_low else '>='} {num(self.low)}"
            else:
                text = noun
        return text + (" or null" if self.optional else "")


#: The engine's settings and what each accepts, by field name of BaseSpec, DataSpec, TrialSpec.
#: One table: the specs check themselves against it and the orchestrator's schema reads it.
LIMITS = {
    "quant_type": Limit(choices=QUANT_TYPES),
    "compute_dtype": Limit(choices=COMPUTE_DTYPES),
    "format": Limit(choices=DATA_FORMATS),
    "packing": Limit(choices=DATA_PACKING),
    "eval_fraction": Limit(0, 1, open_high=True),
    "seq_len": Limit(8, 131072, integer=True),
    "max_eval_examples": Limit(1, integer=True, optional=True),
    "r": Limit(1, 1024, integer=True),
    "init": Limit(choices=LORA_INITS),
    "loftq_iter": Limit(1, 1, integer=True),
    "alpha": Limit(0, open_low=True),
    "dropout": Limit(0, 1, open_high=True),
    "learning_rate": Limit(0, 1, open_low=True),
    "weight_decay": Limit(0),
    "warmup_steps": Limit(0, integer=True),
    "warmup_ratio": Limit(0, 1, open_high=True),
    "num_epochs": Limit(0, 100_000, open_low=True, optional=True),
    "lr_schedule": Limit(choices=LR_SCHEDULES),
    "max_steps": Limit(1, 10_000_000, integer=True),
    "micro_batch_size": Limit(1, integer=True),
    "grad_accum_steps": Limit(1, integer=True),
    "max_grad_norm": Limit(0),
    "optimizer": Limit(choices=OPTIMIZERS),
    "eval_every": Limit(0, integer=True),
    "eval_samples": Limit(0, integer=True),
    "eval_max_new_tokens": Limit(1, 4096, integer=True),
    "inject_oom_at_step": Limit(1, integer=True, optional=True),
}


#: What each value of `rank_pattern` / `alpha_pattern` accepts: those of `r` / `alpha`.
PATTERN_LIMITS = {"rank_pattern": LIMITS["r"], "alpha_pattern": LIMITS["alpha"]}


def pattern_error(name: str, pattern: dict) -> str | None:
    """Why `pattern` (`rank_pattern` or `alpha_pattern`: module pattern -> value) is refused, or
    None. Keys are regular expressions matched as PEFT matches them (see `pattern_value`)."""
    limit = PATTERN_LIMITS[name]
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            return f"keys must be non-empty module names or regular expressions, got {key!r}"
        try:
            re.compile(key)
        except re.error as e:
            return f"{key!r} is not a regular expression ({e})"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (limit.integer and value != int(value)) or not limit.ok(value):
            return f"the value of {key!r} must be {limit.allowed}, got {value!r}"
    return None


MIX_KEYS = ("path", "weight", "label", "name", "split", "revision", "format")


@dataclass(frozen=True)
class MixSource:
    """One source of a mixture (`DataSpec.mix`): its rows are drawn with probability
    weight / (sum of weights); `label` names its `eval_loss_<label>` (default: from the path)."""

    path: str
    weight: float = 1.0
    label: str = ""
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    format: str | None = None  # None: the DataSpec's format


def mix_error(mix) -> str | None:
    """Why `mix` (a list of {path, weight, ...} mappings) is refused as `data.mix`, or None."""
    if not isinstance(mix, list | tuple) or len(mix) < 2:
        return "a list of 2 or more sources"
    for i, entry in enumerate(mix):
        if isinstance(entry, MixSource):
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not entry["path"].strip():
            return f"entry {i} has no path"
        unknown = sorted(set(entry) - set(MIX_KEYS))
        if unknown:
            return f"entry {i}: unknown key {unknown[0]!r}; known: {', '.join(MIX_KEYS)}"
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            return f"entry {i}: weight must be a number > 0, got {weight!r}"
        fmt = entry.get("format")
        if fmt is not None and fmt not in DATA_FORMATS:
            return f"entry {i}: format must be one of {', '.join(DATA_FORMATS)}, got {fmt!r}"
    labels = [label for label, _ in mix_labels(mix)]
    if len(set(labels)) != len(labels):
        return f"two sources share the label {_first_repeat(labels)!r}; give each a label"
    return None


def _first_repeat(items: list) -> object:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def mix_sources(mix) -> tuple[MixSource, ...]:
    """`data.mix` entries as MixSources (labels filled in)."""
    out = []
    for (label, entry) in mix_labels(mix):
        fields_ = entry if isinstance(entry, dict) else asdict(entry)
        out.append(MixSource(**{**fields_, "weight": float(fields_.get("weight", 1.0)),
                                "label": label}))
    return tuple(out)


def mix_labels(mix) -> list[tuple[str, object]]:
    """(label, entry) of each source: its `label`, else its path's last part without the
    extension, reduced to letters, digits and _ (metric names: eval_loss_<label>)."""
    out = []
    for entry in mix:
        get = entry.get if isinstance(entry, dict) else lambda k, e=entry: getattr(e, k, None)
        label = get("label") or re.sub(r"\W+", "_", re.sub(r"\.\w+$", "", str(get("path"))
                                                           .rstrip("/").rsplit("/", 1)[-1]))
        out.append((label.strip("_") or "source", entry))
    return out


def pattern_value(pattern: tuple[tuple[str, float], ...], path: str, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the value of the first key (in the order
    given) that matches the whole module path or its tail after a dot (`re.match` of
    `(.*\\.)?(KEY)$`), else `default`."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def steps_for_epochs(num_epochs: float, n_train: int, micro_batch_size: int,
                     grad_accum_steps: int) -> int:
    """Optimizer steps that show a trial `num_epochs` passes over its `n_train` training rows:
    ceil(num_epochs x n_train / (micro_batch_size x grad_accum_steps)), at least 1. A trial's
    stream runs on across epoch boundaries, so the last step may start the next epoch."""
    per_step = micro_batch_size * grad_accum_steps
    return max(1, math.ceil(num_epochs * n_train / per_step - 1e-9))


def _check_limits(spec) -> None:
    """Raise ValueError naming the first field of `spec` that its `LIMITS` entry refuses."""
    for f in fields(spec):
        limit = LIMITS.get(f.name)
        value = getattr(spec, f.name)
        if limit is not None and not limit.ok(value):
            raise ValueError(f"{f.name} must be {limit.allowed}, got {value!r}")


class TrialStatus(str, Enum):
    """How a trial ended. A str, so it compares, prints and serializes as its value."""

    FINISHED = "finished"  # ran to max_steps
    STOPPED = "stopped"  # stopped early by the search (ASHA, Optuna pruning): a valid result
    DIVERGED = "diverged"  # its loss or gradient norm became NaN/inf
    FAILED = "failed"  # an error, a lost worker past its retries, out of memory alone

    def __str__(self) -> str:
        return self.value

    @property
    def succeeded(self) -> bool:
        """A result to compare and keep (its adapter is exported): finished or stopped early."""
        return self in (TrialStatus.FINISHED, TrialStatus.STOPPED)


def stable_hash(obj: object, length: int = 12) -> str:
    """A short hex digest of `obj`'s canonical JSON: equal inputs give equal ids on any machine."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class BaseSpec:
    """The frozen base model shared by every adapter of a pack."""

    name_or_path: str = TINY
    revision: str | None = None
    quant_type: str = "nf4"  # nf4 | fp4 | int8 | none (16-bit LoRA baseline)
    double_quant: bool = True  # quantize the per-block absmax constants too (~0.37 bit/weight saved)
    compute_dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    activation_offload: bool = False  # keep saved activations in CPU memory (long sequences)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_limits(self)

    def fingerprint(self) -> str:
        """Identity of the loaded weights: trials whose bases share it can share one copy."""
        keys = ("name_or_path", "revision", "quant_type", "double_quant", "compute_dtype",
                "attn_implementation", "trust_remote_code")
        return stable_hash({k: getattr(self, k) for k in keys})


@dataclass(frozen=True)
class DataSpec:
    """A trial's examples: a file (or the bundled dataset when `path` is None) and its tokenization."""

    # a JSONL / JSON / CSV / Parquet file, an fsspec URI of one, a saved dataset folder, a
    # dataset repository folder or hub id (see qlora.sources); None = the bundled dataset
    path: str | None = None
    name: str | None = None  # a hub dataset's configuration (load_dataset's `name`)
    split: str = "train"  # the split of a saved folder, repository or hub id
    revision: str | None = None  # a hub dataset's revision (branch, tag or commit)
    format: str = "auto"  # auto | alpaca | chat | prompt_completion | text
    eval_path: str | None = None
    eval_fraction: float = 0.1  # deterministic split when eval_path is None
    seq_len: int = 256
    train_on_prompt: bool = False
    skip_invalid: bool = False
    packing: str = "none"  # none | pack (several short examples per sequence)
    max_eval_examples: int | None = 128  # evaluation cost bound; None = the whole eval split
    # a mixture: rows of each source drawn by weight (path, name, split, revision unused)
    mix: tuple[MixSource, ...] = ()

    def __post_init__(self) -> None:
        _check_limits(self)



@dataclass(frozen=True)
class TrialSpec:
    """One adapter and its training recipe."""

    trial_id: str
    seed: int = 0
    name: str = ""
    # LoRA
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (rsLoRA, as PEFT)
    # per module, PEFT's names and matching: ((pattern, rank), ...); a dict is accepted too
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # gaussian (PEFT's default: B = 0) | loftq (B A from the base's quantization error)
    init: str = "gaussian"
    loftq_iter: int = 1  # one step is the optimum on a shared base (see qlora.loftq)
    # optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a fraction of max_steps (exclusive with warmup_steps)
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup, to 0 at max_steps
    max_steps: int = 100
    # passes over the train split; when set, `train_pack` sets max_steps from it (`resolved`)
    num_epochs: float | None = None
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping; applied to this adapter's gradients only
    optimizer: str = "paged_adamw_32bit"
    # evaluation
    eval_every: int = 0  # 0 = only at the end
    eval_samples: int = 0  # eval prompts answered greedily at each evaluation (0 = none)
    eval_max_new_tokens: int = 32  # longest answer, in tokens (eos ends one sooner)
    eval_metric: str | None = None  # package.module:function(prediction, reference) -> float
    data: DataSpec = field(default_factory=DataSpec)
    # fault injection for tests: raise torch.OutOfMemoryError at this step (None = never)
    inject_oom_at_step: int | None = None

    def __post_init__(self) -> None:
        _check_limits(self)
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in PATTERN_LIMITS:
            value = getattr(self, name)
            pairs = tuple(value.items()) if isinstance(value, dict) else tuple(map(tuple, value))
            object.__setattr__(self, name, pairs)
            error = pattern_error(name, dict(pairs))
            if error:
                raise ValueError(f"{name}: {error}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("warmup_steps and warmup_ratio are exclusive: set one of them")

    def rank_of(self, path: str) -> int:
        """The rank of this adapter on module `path` (`rank_pattern`, else `r`)."""
        return int(pattern_value(self.rank_pattern, path, self.r))

    def alpha_of(self, path: str) -> float:
        """The alpha of this adapter on module `path` (`alpha_pattern`, else `alpha`)."""
        return float(pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_of(self, path: str) -> float:
        """The low-rank path's scale on `path`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r = self.rank_of(path)
        return self.alpha_of(path) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def warmup(self) -> int:
        """Warmup steps as trained: `warmup_steps`, or ceil(warmup_ratio x max_steps) (as
        transformers' `get_warmup_steps`)."""
        if self.warmup_ratio:
            return math.ceil(self.warmup_ratio * self.max_steps)
        return self.warmup_steps

    def resolved(self, n_train: int) -> TrialSpec:
        """This trial with `max_steps` as it trains on `n_train` training rows: from
        `num_epochs` when that is set (see `steps_for_epochs`), else unchanged."""
        if self.num_epochs is None:
            return self
        steps = steps_for_epochs(self.num_epochs, n_train, self.micro_batch_size,
                                 self.grad_accum_steps)
        return replace(self, max_steps=steps)

    def to_dict(self) -> dict:
        return asdict(self)
