"""qlora: the engine for one device.

Load one frozen quantized base, train K independent LoRA adapters on it in one pass, export each
in PEFT's format. Needs torch, transformers, peft, bitsandbytes, datasets and safetensors only:
never Ray, MLflow or Hydra.

    from qlora import BaseSpec, TrialSpec, load_base, train_pack
    base = load_base(BaseSpec(name_or_path="tiny", compute_dtype="float32"))
    results = train_pack(base, [TrialSpec(trial_id="a", r=8), TrialSpec(trial_id="b", r=16)])
"""

from .base import Base, load_base
from .config import BaseSpec, DataSpec, TrialSpec, stable_hash
from .export import adapter_files, write_adapter
from .memory import MemoryEstimate, estimate_memory
from .train import TrialResult, adapter_logits, evaluate, train_pack

__all__ = [
    "Base", "BaseSpec", "DataSpec", "MemoryEstimate", "TrialResult", "TrialSpec", "adapter_files",
    "adapter_logits", "estimate_memory", "evaluate", "load_base", "stable_hash", "train_pack",
    "write_adapter",
]
