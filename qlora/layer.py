"""The multi-adapter LoRA layer: K independent adapters on one frozen (quantized) linear.

The batch is the concatenation of K row segments, one per adapter. The frozen base projection
runs once over all rows (one dequantization of the NF4 weight per pass, whatever K is), and
adapter k's low-rank path, B_k A_k dropout_k(x) * scale_k, is added to its own rows only (scale_k is
alpha / r, or alpha / sqrt(r) with rsLoRA; rank and alpha may differ per module, `rank_pattern`).
Because nothing else in a decoder mixes batch rows, adapter k's outputs, loss and gradients depend
on its own rows alone: that is what makes a packed trial numerically the trial alone.

Two details keep that promise under randomness:
- Initialisation (PEFT's: A Kaiming-uniform, B zero) draws from a generator seeded by the trial's
  seed and the module's path, so it does not depend on the pack or on the global RNG.
- Dropout masks are drawn from a generator seeded by (trial seed, module path, the trial's own
  micro-step), not the global RNG: the same mask whichever pack the trial is in, and the same mask
  again when gradient checkpointing recomputes the forward pass.

Speed: when every segment has the same number of rows and an adapter on this layer (the usual
training pack), the K low-rank paths run as two batched matmuls over the K adapters, their A and
B stacked (ranks zero-padded to the largest, which adds exact zeros: adapters of different ranks on
one layer, from `lora.r` or `rank_pattern`, batch together exactly), and one addition into the
base's output; otherwise one segment at a time. Profiler labels are entered only while a profiler
runs, since entering one costs about as much as a small matmul on a CPU.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
    """Which rows go to which adapter in the current pass; shared by every MultiLoraLinear.

    Set only through `route`, which checks the segments before any compute and always resets
    them, so a pass can never run with the rows of an earlier one.
    """

    segments: list[Segment] = field(default_factory=list)

    @contextmanager
    def route(self, segments: list[Segment]) -> Iterator[None]:
        """Route rows to adapters for the passes inside the block (backward included, since
        checkpointed blocks recompute their forward there)."""
        if self.segments:
            raise RuntimeError("routing is already set: passes of two packs cannot nest")
        end = 0
        for seg in segments:
            if seg.start != end or seg.end <= seg.start:
                raise ValueError(f"routing segments must tile the batch in order, got {segments}")
            end = seg.end
        self.segments = list(segments)
        try:
            yield
        finally:
            self.segments = []


def _seed_of(*parts: object) -> int:
    return int(stable_hash(parts, 15), 16)


def _mix(seed: int, tick: int) -> int:
    """A 63-bit seed for micro-step `tick` from an adapter's dropout seed (splitmix64's step)."""
    z = (seed + (tick + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1


def label(name: str):
    """`record_function(name)` while a profiler runs, else a no-op context."""
    if torch._C._autograd._profiler_enabled():
        return record_function(name)
    return contextlib.nullcontext()


class LoraAdapter(nn.Module):
    """One adapter's A (r x in) and B (out x r), kept in float32 as PEFT keeps them for k-bit bases."""

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float,
                 seed: int, path: str, device: torch.device) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
        self.scale = scale  # alpha / r, or alpha / sqrt(r) with rsLoRA (TrialSpec.scale_of)
        self.dropout = dropout
        self.seed = seed
        self.path = path
        self.r = r
        self._drop_seed = _seed_of("drop", seed, path)  # hashed once; mixed with the tick per pass
        self._gen: torch.Generator | None = None
        gen = torch.Generator(device="cpu").manual_seed(_seed_of("init", seed, path))
        with torch.no_grad():
            # PEFT's init: kaiming_uniform_(a=sqrt(5)) on A, zeros on B. Drawn on the CPU so the
            # same seed gives the same adapter on any device.
            a = torch.empty_like(self.lora_A.weight, device="cpu")
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            self.lora_A.weight.copy_(a)
            nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor, tick: int, training: bool, width: int = 0) -> torch.Tensor:
        """B A dropout(x) * scale for these rows."""
        return self.lora_B(self.lora_A(self.dropped(x, tick, training, width))) * self.scale

    def dropped(self, x: torch.Tensor, tick: int, training: bool, width: int = 0) -> torch.Tensor:
        """x in the adapter's dtype, with this micro-step's dropout mask applied when training."""
        x = x.to(self.lora_A.weight.dtype)
        if training and self.dropout > 0:
            if self._gen is None or self._gen.device != x.device:
                self._gen = torch.Generator(device=x.device)
            gen = self._gen.manual_seed(_mix(self._drop_seed, tick))
            if x.dim() == 3:  # (rows, T, features): draw on the (rows, width, features) canvas
                canvas = (x.shape[0], max(width, x.shape[1]), x.shape[2])
                draw = torch.rand(canvas, device=x.device, generator=gen)[:, : x.shape[1]]
            else:
                draw = torch.rand(x.shape, device=x.device, generator=gen)
            # One pass: keep with probability 1 - p, scaled as nn.Dropout scales.
            x = torch.where(draw >= self.dropout, x * (1.0 / (1.0 - self.dropout)), 0.0)
        return x


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
        with label("qlora.base_linear"):
            out = self.base_layer(x, *args, **kwargs)
        segments = self.routing.segments
        if not segments:
            return out
        if segments[0].start != 0 or segments[-1].end != x.shape[0]:
            raise ValueError("routing segments must cover the batch")
        with label("qlora.lora"):
            return out + self._deltas(x, segments).to(out.dtype)

    def _deltas(self, x: torch.Tensor, segments) -> torch.Tensor:
        """The adapters' outputs for every row, in the shape of the base's output."""
        adapters = [self.adapters[s.slot] if s.slot in self.adapters else None for s in segments]
        rows = segments[0].end - segments[0].start
        if None not in adapters and all(s.end - s.start == rows for s in segments):
            if len(segments) == 1:
                seg = segments[0]
                return adapters[0].delta(x, seg.tick, self.training, seg.width)
            return self._batched(x, segments, adapters)
        deltas = []
        for seg, adapter in zip(segments, adapters, strict=True):
            if adapter is None:
                deltas.append(x.new_zeros((seg.end - seg.start, *x.shape[1:-1],
                                           self.out_features), dtype=torch.float32))
            else:
                deltas.append(adapter.delta(x[seg.start:seg.end], seg.tick, self.training,
                                            seg.width))
        return torch.cat(deltas, dim=0)

    def _batched(self, x: torch.Tensor, segments, adapters) -> torch.Tensor:
        """K equal segments through K adapters as two batched matmuls (ranks zero-padded)."""
        k = len(segments)
        r = max(a.r for a in adapters)
        if any(a.dropout > 0 for a in adapters) and self.training:
            xs = torch.stack([a.dropped(x[s.start:s.end], s.tick, True, s.width)
                              for s, a in zip(segments, adapters, strict=True)])
        else:
            xs = x.to(adapters[0].lora_A.weight.dtype)
        xs = xs.reshape(k, -1, x.shape[-1])
        a_w = torch.stack([_pad_rows(a.lora_A.weight, r) for a in adapters])  # (K, r, in)
        b_w = torch.stack([_pad_cols(a.lora_B.weight, r) for a in adapters])  # (K, out, r)
        scale = xs.new_tensor([a.scale for a in adapters]).view(k, 1, 1)
        delta = torch.bmm(torch.bmm(xs, a_w.transpose(1, 2)), b_w.transpose(1, 2)) * scale
        return delta.reshape(*x.shape[:-1], self.out_features)


def _pad_rows(w: torch.Tensor, r: int) -> torch.Tensor:
    return w if w.shape[0] == r else F.pad(w, (0, 0, 0, r - w.shape[0]))


def _pad_cols(w: torch.Tensor, r: int) -> torch.Tensor:
    return w if w.shape[1] == r else F.pad(w, (0, r - w.shape[1]))


def is_linear(module: nn.Module) -> bool:
    """True for the linears LoRA can target: torch's and bitsandbytes' quantized ones."""
    if isinstance(module, nn.Linear):
        return True
    # A quantized linear exists only once bitsandbytes is imported: never import it here (a
    # driver checking a model's skeleton has no use for its kernels, nor its import warnings).
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


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
