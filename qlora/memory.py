"""Predicted peak memory of a pack, for the planner to cut packs to a device's memory.

The formula (bytes; N = tokens per micro-step of one trial = micro_batch_size x the longest row
of its training data (at most seq_len; `rows`, from `rows_of`: seq_len when not given), M =
labels kept per micro-step = micro_batch_size x the most labels one row keeps (N when not given;
the engine forms logits only where labels are kept), L layers, h hidden size, i intermediate
size, V vocabulary, K trials, b = bytes of compute dtype):

    base         = sum over quantized linears of  n x (4 bits + block constants)     nf4/fp4
                       block constants: 32/64 bits, or 8/64 + 32/(64*256) with double quant
                 + sum over int8 linears of n x 1 byte + 4 bytes per output row       int8
                 + n x b for linears when quant is none
                 + every other weight (embeddings, norms, lm_head) x 4   (kept in float32 for
                   k-bit training; x b when quant is none)
    adapters     = sum_k P_k x 4      (P_k = sum over targeted linears r_k (in + out), fp32; r_k
                                        per module where rank_pattern sets it)
    gradients    = sum_k P_k x 4
    optimizer    = sum_k P_k x 8      (AdamW 32-bit: two fp32 moments; 8-bit: x 2)
    activations  = sum_k N_k x per_token, with block = (10 h + 4 i) x b plus, per targeted
                   linear of a layer, the adapter's input h x 4 and rank-r output r x 4:
                     CUDA, checkpointing:  L x h x b (each block's input) + one block
                     CUDA, without:        L x block
                     CPU:                  1.2 x L x block with checkpointing, 1.4 x without
    logits       = max_k M_k x V x 4 x 3   (fp32 logits, softmax and its gradient, one trial at a
                   time since losses are formed per segment)
    overhead     = CUDA: a fixed 0.6 GiB (context, cuBLAS workspace, allocator slack)
                   CPU:  28 MiB (what the first load and step add to a process's RSS besides
                         tensors) + 3 MiB per trial (its optimizer's and autograd's bookkeeping)
                         + the quantized linears at n x b (their 16/32-bit weights are read
                         before quantization, and the allocator keeps those pages)

What it predicts on a CPU is the process's RSS high-water above its RSS before the base loaded
(the Python and torch runtime left out); on CUDA, `torch.cuda.max_memory_allocated` plus the
overhead. The CPU activation factors, the 28 MiB and the 3 MiB per trial are fitted to
`make bench`'s CPU rows (both shapes, both kinds of data, K = 1 to 8; 2026-12-07), with the
runtime being what a worker imports before any pack (torch, transformers, pyarrow): a
CPU allocator keeps the pages of the checkpointed recompute and of the backward pass, so the
RSS high-water exceeds a whole un-checkpointed graph's activations even with checkpointing
(BENCHMARKS.md gives estimate against measured). The GPU terms are not yet checked against a GPU run. It is an estimate, not a bound:
the planner keeps a safety margin, and a pack that still runs out of memory is split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .config import BaseSpec, DataSpec, TrialSpec

GIB = 1024**3
CUDA_OVERHEAD = int(0.6 * GIB)
CPU_RUNTIME = 28 * 2**20
CPU_PER_TRIAL = 3 * 2**20
CPU_ACTIVATION_FACTOR = {True: 1.2, False: 1.4}  # keyed by gradient checkpointing
_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class MemoryEstimate:
    base: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class RowTokens:
    """The most one training row of a dataset holds: its tokens (what activations scale with)
    and its kept labels (where the engine forms logits)."""

    tokens: int
    kept: int


def rows_of(data) -> RowTokens | None:
    """`RowTokens` of a `qlora.data.TokenizedData`'s train split (read from its token offsets,
    no row built), or None for a split that cannot tell (then the estimate takes seq_len)."""
    longest = getattr(data.train, "longest", None)
    if longest is None:
        return None
    tokens, kept = longest()
    return RowTokens(int(tokens), int(kept))


def model_shapes(source: str, trust_remote_code: bool = False) -> dict:
    """Linear shapes and other parameter counts of a model, read from its config (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    linears = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linears[path] = (module.in_features, module.out_features)
    linear_params = sum(i * o for i, o in linears.values())
    other = sum(p.numel() for p in model.parameters()) - linear_params
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return dict(linears=linears, other=other, layers=text.num_hidden_layers,
                hidden=text.hidden_size, intermediate=getattr(text, "intermediate_size",
                                                              4 * text.hidden_size),
                vocab=text.vocab_size)


def quantized_linear_bytes(n: int, out_features: int, spec: BaseSpec) -> float:
    """Bytes one frozen linear of n weights occupies under `spec`'s quantization."""
    if spec.quant_type in ("nf4", "fp4"):
        constants = (8 / 64 + 32 / (64 * 256)) if spec.double_quant else 32 / 64
        return n * (4 + constants) / 8
    if spec.quant_type == "int8":
        return n + 4 * out_features
    return n * _BYTES[spec.compute_dtype]


def estimate_memory(spec: BaseSpec, trials: list[TrialSpec], shapes: dict | None = None,
                    device_type: str = "cuda",
                    rows: Mapping[DataSpec, RowTokens] | None = None) -> MemoryEstimate:
    """Predicted peak bytes of training `trials` as one pack on `spec`'s base (see module doc).
    `rows` gives each trial's data (`TrialSpec.data`) its longest row; data it does not name is
    taken as rows of seq_len tokens, every label kept."""
    from .base import resolve_source

    shapes = shapes or model_shapes(resolve_source(spec), spec.trust_remote_code)
    b = _BYTES[spec.compute_dtype]
    base = sum(quantized_linear_bytes(i * o, o, spec) for i, o in shapes["linears"].values())
    base += shapes["other"] * (4 if spec.quant_type != "none" else b)
    loaded_unquantized = (sum(i * o for i, o in shapes["linears"].values()) * b
                          if spec.quant_type != "none" else 0)

    h, i, L, V = shapes["hidden"], shapes["intermediate"], shapes["layers"], shapes["vocab"]
    adapter_params, act, logit_tokens = 0, 0, 0
    optimizer = 0
    for t in trials:
        targets = _targets(shapes["linears"], t.target_modules)
        p = sum(t.rank_of(path) * (fi + fo) for path, (fi, fo) in targets)
        adapter_params += p
        optimizer += p * (2 if t.optimizer == "paged_adamw_8bit" else 8)
        row = (rows or {}).get(t.data)
        longest = min(t.data.seq_len, row.tokens) if row else t.data.seq_len
        n = t.micro_batch_size * longest
        per_layer_lora = sum(h + t.rank_of(path) for path, _ in targets) / max(1, L)
        block = (10 * h + 4 * i) * b + per_layer_lora * 4
        if device_type != "cuda":
            per_token = CPU_ACTIVATION_FACTOR[spec.gradient_checkpointing] * L * block
        elif spec.gradient_checkpointing:
            per_token = L * h * b + block
        else:
            per_token = L * block
        act += n * per_token
        logit_tokens = max(logit_tokens, t.micro_batch_size * min(longest, row.kept) if row
                           else n)
    return MemoryEstimate(
        base=int(base), adapters=adapter_params * 4, gradients=adapter_params * 4,
        optimizer=int(optimizer), activations=int(act), logits=int(logit_tokens * V * 4 * 3),
        overhead=CUDA_OVERHEAD if device_type == "cuda" else CPU_RUNTIME + int(
            loaded_unquantized) + CPU_PER_TRIAL * len(trials),
    )


def _targets(linears: dict, target_modules) -> list[tuple[str, tuple[int, int]]]:
    """(module path, (in, out)) of the linears `target_modules` selects."""
    if target_modules == "all-linear":
        return list(linears.items())
    return [(path, s) for path, s in linears.items()
            if any(path == t or path.endswith("." + t) for t in target_modules)]


# -- measuring what the estimate predicts ---------------------------------------------------------

def rss_bytes() -> int:
    """This process's resident memory now (Linux), e.g. before a base loads: the runtime's share."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start a new peak: CUDA's max-allocated counter, or on a CPU the RSS high-water (VmHWM)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size to the current one
    except OSError:  # not Linux, or not allowed: the peak then covers the process's life
        pass


def peak_bytes() -> int:
    """The peak since `reset_peak`: CUDA max allocated, or the process's RSS high-water."""
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measured_bits_per_weight(model) -> float:
    """Bits per weight of a loaded model's linears (lm_head excluded), from the tensors that hold
    them: packed 4-bit codes plus block constants (and their constants with double quantization),
    int8 codes, or the plain weight. What the formula above predicts, measured."""
    import bitsandbytes as bnb
    import torch

    bits = weights = 0
    vocab = model.config.vocab_size
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            n = w.shape[0] * w.shape[1] if w.dim() == 2 and w.shape[1] != 1 else qs.shape.numel()
            stored = w.numel() * w.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                stored += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            bits, weights = bits + 8 * stored, weights + n
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight
            bits += 8 * w.numel() * w.element_size()
            weights += w.numel()
        elif isinstance(module, torch.nn.Linear) and module.out_features != vocab:
            bits += 8 * module.weight.numel() * module.weight.element_size()
            weights += module.weight.numel()
    return bits / weights
