"""qlora: the engine for one device.

Load one frozen quantized base, train K independent LoRA adapters on it in one pass, export each
in PEFT's format. Needs torch, transformers, peft, bitsandbytes, datasets and safetensors only:
never Ray, MLflow or Hydra.

    from qlora import BaseSpec, TrialSpec, load_base, train_pack
    base = load_base(BaseSpec(name_or_path="tiny", compute_dtype="float32"))
    results = train_pack(base, [TrialSpec(trial_id="a", r=8), TrialSpec(trial_id="b", r=16)])

Names are imported on first use, so `qlora.config` and `qlora.data`'s validation stay light
(no torch) for a command-line tool that checks its input before loading anything.
"""

from importlib import import_module

_EXPORTS = {
    "Base": "base", "load_base": "base",
    "BaseSpec": "config", "DataSpec": "config", "TrialSpec": "config", "TrialStatus": "config",
    "stable_hash": "config",
    "adapter_files": "export", "write_adapter": "export",
    "MemoryEstimate": "memory", "estimate_memory": "memory",
    "greedy": "generate", "judge": "generate",
    "TrialResult": "train", "adapter_logits": "evaluate", "evaluate": "evaluate",
    "train_pack": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qlora' has no attribute {name!r}")
