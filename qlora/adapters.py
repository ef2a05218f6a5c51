"""Adding and removing one trial's adapter on a loaded base, and reading its weights."""

from __future__ import annotations

import torch

from .base import Base
from .config import TrialSpec
from .layer import LoraAdapter, MultiLoraLinear, Routing, target_paths, wrap


def routing_of(base: Base) -> Routing:
    """The base's shared Routing (created on first use)."""
    if not hasattr(base, "_routing"):
        base._routing = Routing()
    return base._routing


def inject(base: Base, slot: str, spec: TrialSpec) -> list[torch.nn.Parameter]:
    """Give every targeted linear of `base` an adapter named `slot` for `spec`; returns its params.

    Only the new adapter's parameters require gradients: the base stays frozen. Each module gets
    the rank and scale `spec` gives its path (`rank_pattern`, `alpha_pattern`, `use_rslora`),
    and starts as `spec.init` says: PEFT's default, or LoftQ's factors of the base's
    quantization error on that module (`qlora.loftq`).
    """
    routing = routing_of(base)
    params: list[torch.nn.Parameter] = []
    residuals = _residuals(base) if spec.init == "loftq" else None
    for path in target_paths(base.model, spec.target_modules):
        layer = wrap(base.model, path, routing)
        base.layers[path] = layer
        if slot in layer.adapters:
            raise ValueError(f"slot {slot!r} already holds an adapter on {path}")
        weight = layer.base_layer.weight
        device = weight.device if weight.device.type != "meta" else base.device
        adapter = LoraAdapter(layer.in_features, layer.out_features, spec.rank_of(path),
                              spec.scale_of(path), spec.dropout, spec.seed, path, device)
        if residuals is not None:
            a, b = residuals.factors(path, layer.base_layer, adapter.r, adapter.scale)
            with torch.no_grad():
                adapter.lora_A.weight.copy_(a)
                adapter.lora_B.weight.copy_(b)
        layer.adapters[slot] = adapter
        params.extend(adapter.parameters())
    return params


def _residuals(base: Base):
    """The base's quantization error, for LoftQ: one per loaded base (`qlora.loftq.Residuals`)."""
    from .config import LOFTQ_QUANT_TYPES
    from .loftq import Residuals

    if base.spec.quant_type not in LOFTQ_QUANT_TYPES:
        raise ValueError(f"lora.init=loftq needs a quantized base (quant_type one of "
                         f"{', '.join(LOFTQ_QUANT_TYPES)}): a {base.spec.quant_type!r} base has no "
                         "quantization error to start from")
    if getattr(base, "_residuals", None) is None:
        base._residuals = Residuals(base.source, base.spec.revision)
    return base._residuals


def remove(base: Base, slot: str) -> None:
    """Drop adapter `slot` from every layer (the base is then as it was for that slot)."""
    for layer in base.layers.values():
        if slot in layer.adapters:
            del layer.adapters[slot]


def adapter_layers(base: Base, slot: str) -> dict[str, MultiLoraLinear]:
    """Module path -> layer, for the layers that hold adapter `slot`."""
    return {p: layer for p, layer in base.layers.items() if slot in layer.adapters}


def adapter_state(base: Base, slot: str) -> dict[str, torch.Tensor]:
    """Adapter `slot`'s weights keyed by module path: `<path>.lora_A.weight`, `<path>.lora_B.weight`."""
    state = {}
    for path, layer in adapter_layers(base, slot).items():
        adapter = layer.adapters[slot]
        state[f"{path}.lora_A.weight"] = adapter.lora_A.weight.detach().cpu().contiguous()
        state[f"{path}.lora_B.weight"] = adapter.lora_B.weight.detach().cpu().contiguous()
    return state


def load_adapter_state(base: Base, slot: str, state: dict[str, torch.Tensor]) -> None:
    """Copy weights saved by `adapter_state` back into adapter `slot`."""
    with torch.no_grad():
        for path, layer in adapter_layers(base, slot).items():
            adapter = layer.adapters[slot]
            adapter.lora_A.weight.copy_(state[f"{path}.lora_A.weight"])
            adapter.lora_B.weight.copy_(state[f"{path}.lora_B.weight"])
