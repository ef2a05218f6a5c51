"""The multi-adapter LoRA layer: K independent adapters on one frozen (quantized) linear.

The batch is the concatenation of K row segments, one per adapter. The frozen base projection
runs once over all rows (one dequantization of the NF4 weight per pass, whatever K is), and
adapter k's low-rank path, B_k A_k dropout_k(x) * alpha_k / r_k, is added to its own rows only.
Because nothing else in a decoder mixes batch rows, adapter k's outputs, loss and gradients depend
on its own rows alone: that is what makes a packed trial numerically the trial alone.

Two details keep that promise under randomness:
- Initialisation (PEFT's: A Kaiming-uniform, B zero) draws from a generator seeded by the trial's
  seed and the module's path, so it does not depend on the pack or on the global RNG.
- Dropout masks are drawn from a generator seeded by (trial seed, module path, the trial's own
  micro-step), not the global RNG: the same mask whichever pack the trial is in, and the same mask
  again when gradient checkpointing recomputes the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.profiler import record_function

from .config import stable_hash


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch belong to adapter `slot`.

    `tick` keys its dropout masks; `width` is the trial's own maximum sequence length, the fixed
    canvas masks are drawn on, so a token's mask does not depend on how far its batch is padded.
    """

    slot: str
    start: int
    end: int
    tick: int = 0
    width: int = 0


@dataclass
class Routing:
    """Which rows go to which adapter in the current pass; shared by every MultiLoraLinear."""

    segments: list[Segment] = field(default_factory=list)


def _seed_of(*parts: object) -> int:
    return int(stable_hash(parts, 15), 16)


class LoraAdapter(nn.Module):
    """One adapter's A (r x in) and B (out x r), kept in float32 as PEFT keeps them for k-bit bases."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 seed: int, path: str, device: torch.device) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.scale = alpha / r
        self.dropout = dropout
        self.seed = seed
        self.path = path
        gen = torch.Generator(device="cpu").manual_seed(_seed_of("init", seed, path))
        with torch.no_grad():
            # PEFT's init: kaiming_uniform_(a=sqrt(5)) on A, zeros on B. Drawn on the CPU so the
            # same seed gives the same adapter on any device.
            a = torch.empty_like(self.lora_A.weight, device="cpu")
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            self.lora_A.weight.copy_(a)
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor, tick: int, training: bool, width: int = 0) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        if training and self.dropout > 0:
            gen = torch.Generator(device=x.device).manual_seed(_seed_of("drop", self.seed,
                                                                        self.path, tick))
            if x.dim() == 3:  # (rows, T, features): draw on the (rows, width, features) canvas
                canvas = (x.shape[0], max(width, x.shape[1]), x.shape[2])
                draw = torch.rand(canvas, device=x.device, generator=gen)[:, : x.shape[1]]
            else:
                draw = torch.rand(x.shape, device=x.device, generator=gen)
            # One pass: keep with probability 1 - p, scaled as nn.Dropout scales.
            x = torch.where(draw >= self.dropout, x * (1.0 / (1.0 - self.dropout)), 0.0)
        return self.lora_B(self.lora_A(x)) * self.scale


class MultiLoraLinear(nn.Module):
    """A frozen linear (nn.Linear, bnb Linear4bit or Linear8bitLt) with K routed adapters."""

    def __init__(self, base_layer: nn.Module, routing: Routing, path: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.path = path
        self.adapters = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with record_function("qlora.base_linear"):
            out = self.base_layer(x, *args, **kwargs)
        segments = self.routing.segments
        if not segments:
            return out
        with record_function("qlora.lora"):
            return self._add_adapters(x, out, segments)

    def _add_adapters(self, x: torch.Tensor, out: torch.Tensor, segments) -> torch.Tensor:
        deltas = []
        for seg in segments:
            adapter = self.adapters[seg.slot] if seg.slot in self.adapters else None
            rows = x[seg.start:seg.end]
            if adapter is None:
                deltas.append(out.new_zeros((seg.end - seg.start, *out.shape[1:])))
            else:
                deltas.append(adapter.delta(rows, seg.tick, self.training, seg.width).to(out.dtype))
        if segments[0].start != 0 or segments[-1].end != x.shape[0]:
            raise ValueError("routing segments must cover the batch")
        return out + torch.cat(deltas, dim=0)


def is_linear(module: nn.Module) -> bool:
    """True for the linears LoRA can target: torch's and bitsandbytes' quantized ones."""
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb

        return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False


def target_paths(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[str]:
    """Module paths of the linears `target_modules` selects (PEFT's matching rules).

    `"all-linear"` selects every linear of the decoder except the output layer (lm_head).
    A list selects modules whose path equals a name or ends with `.name`.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    paths = []
    for path, module in model.named_modules():
        if ".adapters." in path or path.endswith(".base_layer"):
            continue  # inside a wrapper: its base and its own lora_A / lora_B
        if isinstance(module, MultiLoraLinear):
            module = module.base_layer
        if not is_linear(module) or module is output:
            continue
        if target_modules == "all-linear":
            paths.append(path)
        elif isinstance(target_modules, str):
            raise ValueError(f"target_modules must be 'all-linear' or a list, got {target_modules!r}")
        elif any(path == t or path.endswith("." + t) for t in target_modules):
            paths.append(path)
    if not paths:
        raise ValueError(f"target_modules {target_modules!r} match no linear layer of the model")
    return paths


def wrap(model: nn.Module, path: str, routing: Routing) -> MultiLoraLinear:
    """Replace the linear at `path` by a MultiLoraLinear around it (idempotent)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = getattr(parent, child)
    if isinstance(module, MultiLoraLinear):
        return module
    wrapped = MultiLoraLinear(module, routing, path)
    setattr(parent, child, wrapped)
    return wrapped
