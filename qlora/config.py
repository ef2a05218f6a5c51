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
from dataclasses import asdict, dataclass, field
from enum import Enum

QUANT_TYPES = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")
LR_SCHEDULES = ("cosine", "linear", "constant")
DATA_FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "text")
DATA_PACKING = ("none", "pack")

#: The model built locally from a config (see `qlora.tiny`), never downloaded.
TINY = "tiny"
#: Label of tokens that take no loss (prompt, padding): PyTorch's cross-entropy ignore_index.
IGNORE = -100


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
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}"
            )

    def fingerprint(self) -> str:
        """Identity of the loaded weights: trials whose bases share it can share one copy."""
        keys = ("name_or_path", "revision", "quant_type", "double_quant", "compute_dtype",
                "attn_implementation", "trust_remote_code")
        return stable_hash({k: getattr(self, k) for k in keys})


@dataclass(frozen=True)
class DataSpec:
    """A trial's examples: a file (or the bundled dataset when `path` is None) and its tokenization."""

    path: str | None = None  # JSONL / JSON / CSV / Parquet; None = the bundled dataset
    format: str = "auto"  # auto | alpaca | chat | prompt_completion | text
    eval_path: str | None = None
    eval_fraction: float = 0.1  # deterministic split when eval_path is None
    seq_len: int = 256
    train_on_prompt: bool = False
    skip_invalid: bool = False
    packing: str = "none"  # none | pack (several short examples per sequence)
    max_eval_examples: int | None = 128  # evaluation cost bound; None = the whole eval split

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ValueError(f"format must be one of {DATA_FORMATS}, got {self.format!r}")
        if self.packing not in DATA_PACKING:
            raise ValueError(f"packing must be one of {DATA_PACKING}, got {self.packing!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")


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
    # optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant, after warmup, to 0 at max_steps
    max_steps: int = 100
    micro_batch_size: int = 4
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping; applied to this adapter's gradients only
    optimizer: str = "paged_adamw_32bit"
    # evaluation
    eval_every: int = 0  # 0 = only at the end
    data: DataSpec = field(default_factory=DataSpec)
    # fault injection for tests: raise torch.OutOfMemoryError at this step (None = never)
    inject_oom_at_step: int | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.max_steps < 1 or self.micro_batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("max_steps, micro_batch_size and grad_accum_steps must be >= 1")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        """LoRA's scaling of the low-rank path, alpha / r (as PEFT without rsLoRA)."""
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)
