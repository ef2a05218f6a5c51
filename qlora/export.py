"""Adapters in PEFT's own format, loadable by `peft.PeftModel.from_pretrained` and vLLM.

A folder with `adapter_config.json` (a `peft.LoraConfig`) and `adapter_model.safetensors` whose
keys are PEFT's: `base_model.model.<module path>.lora_A.weight` (and `lora_B`), adapter name
omitted, as PEFT writes them for its default adapter.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from safetensors.torch import save as save_safetensors

from .adapters import adapter_layers, adapter_state
from .base import Base
from .config import TrialSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_state_dict(base: Base, slot: str) -> dict:
    """Adapter `slot`'s tensors under PEFT's key names."""
    return {PEFT_PREFIX + k: v for k, v in adapter_state(base, slot).items()}


def lora_config(base: Base, slot: str, spec: TrialSpec):
    """The `peft.LoraConfig` describing adapter `slot` (target modules as concrete names; rsLoRA
    and the per-module patterns as PEFT reads them, so PEFT builds the same ranks and scales)."""
    from peft import LoraConfig

    names = sorted({path.rsplit(".", 1)[-1] for path in adapter_layers(base, slot)})
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        target_modules=names,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base.source,
        revision=base.spec.revision,
    )


def adapter_files(base: Base, slot: str, spec: TrialSpec) -> dict[str, bytes]:
    """The two files of the adapter as bytes: {adapter_config.json, adapter_model.safetensors}."""
    with tempfile.TemporaryDirectory() as tmp:
        lora_config(base, slot, spec).save_pretrained(tmp)
        config = (Path(tmp) / CONFIG_NAME).read_bytes()
    weights = save_safetensors(peft_state_dict(base, slot), metadata={"format": "pt"})
    return {CONFIG_NAME: config, WEIGHTS_NAME: weights}


def write_adapter(files: dict[str, bytes], folder: str | Path) -> Path:
    """Write adapter files (as returned by `adapter_files`) into `folder`; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(blob)
        tmp.replace(folder / name)  # atomic: a reader never sees half a file
    return folder
