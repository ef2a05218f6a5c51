"""The frozen base: one place that loads and quantizes a causal LM.

`load_base(spec)` goes through `AutoModelForCausalLM.from_pretrained(path, quantization_config=...)`
for every model, the locally built `tiny` one included, so what the tests exercise is the real
bitsandbytes path. The base is frozen and prepared for k-bit training (PEFT's recipe: norms and
embeddings upcast, input gradients enabled so checkpointed blocks get gradients).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TINY, BaseSpec
from .sources import memo_sha256

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Base:
    """A loaded frozen base. `layers` maps module paths to the MultiLoraLinear wrappers that hold
    the adapters of the trials currently injected (filled by `qlora.adapters.inject`)."""

    spec: BaseSpec
    model: torch.nn.Module
    tokenizer: object
    source: str  # the folder or hub id it was loaded from (goes into adapter_config.json)
    device: torch.device
    layers: dict = field(default_factory=dict)  # module path -> MultiLoraLinear, filled by inject

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.spec.compute_dtype]


def resolve_source(spec: BaseSpec) -> str:
    """The folder or hub id that `from_pretrained` receives: the tiny model is built on demand, a
    known model (`qlora.models.KNOWN`) is fetched, a GGUF file is converted (both cached)."""
    if spec.name_or_path == TINY:
        from .tiny import tiny_model_path

        return str(tiny_model_path())
    from .models import resolve

    return resolve(spec.name_or_path) or spec.name_or_path


_COMMIT = re.compile(r"[0-9a-f]{40}")


def base_commit(spec: BaseSpec) -> str:
    """Which files exactly `spec`'s base is: the hub commit they come from (40 hex; a folder in
    the hub cache's `snapshots/` is its commit), or for a folder of its own `sha256:` and 16 hex
    over its files' names and contents (memoized by their sizes and times: read once). A run
    records it (`model_commit`); loading its adapter pins and checks it (`orchestrator.load`)."""
    source = resolve_source(spec)
    folder = Path(source)
    if folder.is_dir():
        if folder.parent.name == "snapshots" and _COMMIT.fullmatch(folder.name):
            return folder.name
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts))
        stamp = {"folder": str(folder.resolve()),
                 "files": [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
                           for p in files]}
        return "sha256:" + memo_sha256(stamp, lambda: _digest(folder, files))
    from transformers.utils.hub import cached_file, extract_commit_hash

    commit = extract_commit_hash(cached_file(source, "config.json", revision=spec.revision), None)
    if commit is None:
        raise ValueError(f"{source}: no commit found for revision {spec.revision or 'main'}")
    return commit


def _digest(folder: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]


def quantization_config(spec: BaseSpec):
    """transformers' `BitsAndBytesConfig` for the spec, or None for the 16-bit baseline."""
    from transformers import BitsAndBytesConfig

    if spec.quant_type in ("nf4", "fp4"):
        # bitsandbytes quantizes 4-bit weights in blocks of 64 (its default) and, with double
        # quantization, the per-block absmax constants again in blocks of 256.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
        )
    if spec.quant_type == "int8":
        # LLM.int8 casts float32 inputs to float16 on every matmul, as it is meant to, and
        # bitsandbytes logs a warning each time: a flood in every worker's log, not news.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_quiet_int8_cast)
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _quiet_int8_cast(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def load_tokenizer(spec: BaseSpec, source: str | None = None):
    """The tokenizer of `spec`'s model (pad = eos where it has no pad token), without its
    weights: what tokenizes a trial's data, here or in a driver that counts its rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source or resolve_source(spec),
                                              revision=spec.revision,
                                              trust_remote_code=spec.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(spec: BaseSpec, device: str | torch.device | None = None) -> Base:
    """Load, quantize and freeze the base model of `spec` on `device` (default: cuda if present)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    source = resolve_source(spec)
    qconfig = quantization_config(spec)
    kwargs = dict(
        dtype=DTYPES[spec.compute_dtype],
        attn_implementation=spec.attn_implementation,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
    )
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if qconfig is None:
        model.to(device)
    tokenizer = load_tokenizer(spec, source)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if qconfig is not None:
        _upcast_unquantized(model)
        _keep_cpu_layout(model)
    _set_checkpointing(model, spec.gradient_checkpointing,
                       spec.activation_offload and device.type == "cuda")
    model.eval()  # the base has no dropout of its own to train; adapters handle theirs
    return Base(spec=spec, model=model, tokenizer=tokenizer, source=source, device=device)


def target_error(spec: BaseSpec, target_modules) -> str | None:
    """Why `target_modules` selects no linear of `spec`'s model, or None. The model is built on
    the meta device from its config: no weight is read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .layer import is_linear, target_paths

    config = AutoConfig.from_pretrained(resolve_source(spec), revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config,
                                                 trust_remote_code=spec.trust_remote_code)
    try:
        target_paths(model, target_modules)
    except ValueError:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                        if is_linear(m) and m is not model.get_output_embeddings()})
        return (f"{_shown(target_modules)} match no linear module of {spec.name_or_path}; its "
                f"linears are named {', '.join(names)} (or all-linear)")
    return None


def _shown(target_modules) -> str:
    if isinstance(target_modules, str):
        return target_modules
    return "[" + ", ".join(target_modules) + "]"


def _upcast_unquantized(model: torch.nn.Module) -> None:
    """PEFT's k-bit preparation: 16-bit weights that stay unquantized (norms, embeddings, lm_head)
    are kept in float32 for stable training; the 4-/8-bit weights are left as they are."""
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def _keep_cpu_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit weights in their training layout on CPUs with AVX512-BF16.

    On such CPUs a `Linear4bit` that sees a no-grad input in eval mode (an evaluation, or the
    first block of a pass without checkpointing) repacks its weight for a fused inference kernel,
    for good: from then on every matmul of that layer runs in bf16, whatever the compute dtype,
    and through an op with no autograd formula. A trial's numbers would then depend on whether
    something had evaluated before it, and gradients through the base would be wrong.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _set_checkpointing(model: torch.nn.Module, on: bool, offload: bool = False) -> None:
    """Gradient (activation) checkpointing of the decoder blocks, non-reentrant.

    Input gradients are enabled so that checkpointed blocks of a frozen model still get gradients
    to the adapters inside them. With `offload`, transformers >= 5 keeps the checkpointed inputs
    in pinned host memory (the engine offloads the rest of the saved tensors itself).
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if on:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}, offload=offload)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    if on:
        model.enable_input_require_grads()


def dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """The float32 weight a frozen linear computes with: NF4/FP4 codes times their block
    constants, int8 rows times their scales, or a plain weight as it is."""
    import bitsandbytes as bnb

    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        # The row scales move from the weight to the layer's state at its first forward pass.
        scales = w.SCB if getattr(w, "SCB", None) is not None else layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scales).to(torch.float32)
    return w.detach().to(torch.float32)
