"""Adapters in PEFT's own format, loadable by `peft.PeftModel.from_pretrained` and vLLM.

A folder with `adapter_config.json` (a `peft.LoraConfig`) and `adapter_model.safetensors` whose
keys are PEFT's: `base_model.model.<module path>.lora_A.weight` (and `lora_B`), adapter name
omitted, as PEFT writes them for its default adapter.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
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


def dequantized_model(base: Base, dtype: torch.dtype = torch.bfloat16):
    """A plain transformers model (no bitsandbytes, no quantization config) holding `base`'s
    weights as it trains on them: each 4-bit or int8 linear dequantized, every other weight cast
    to `dtype`. Tied weights stay tied."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from .base import dequantized

    state: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for name, module in base.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
            state[f"{name}.weight"] = dequantized(module).to(dtype)
            quantized.add(name)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().to(dtype)
    for name, p in base.model.named_parameters():
        if name.rpartition(".")[0] not in quantized:
            state[name] = p.detach().to(dtype)
    config = copy.deepcopy(base.model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.use_cache = True
    with torch.device("cpu"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and config.tie_word_embeddings}
    if set(missing) - tied or unexpected:
        raise ValueError(f"dequantized weights do not fit the model: missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if tied:
        plain.tie_weights()
    return plain.eval()


def merge_adapter(model, adapter_dir: str | Path):
    """`model` (a plain 16/32-bit model, e.g. `dequantized_model`) with the PEFT adapter in
    `adapter_dir` merged into its weights: a transformers model that needs no PEFT."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
