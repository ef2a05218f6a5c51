"""LoftQ initialisation (arXiv 2310.08659): an adapter that starts where quantization left off.

A quantized base holds Q, not the full-precision W it was made from. LoftQ starts the adapter at
the best rank-r approximation of the error W - dequant(Q), so that Q + scale B A is as close to W
as rank r allows, instead of Q + 0 (PEFT's default: B = 0).

Here Q is the pack's one shared base, the same for every trial whatever its rank or seed (that is
what lets LoftQ and Gaussian trials of different ranks pack together). With Q fixed, LoftQ's
alternation (quantize W - B A, then take the SVD of the residual) has nothing left to alternate:
the truncated SVD of W - dequant(Q) is already the optimum of ||W - Q - scale B A||_F (Eckart-
Young), so one step is the whole of it. More steps would requantize W - B A per trial, that is a
different base per trial, which a shared base cannot be; `TrialSpec.loftq_iter` is therefore 1.

The factors are split evenly: A = sqrt(S / scale) V^T, B = U sqrt(S / scale), so scale B A is the
rank-r part of the residual for any alpha (PEFT's `replace_lora_weights_loftq` leaves the scale
out, which is exact only at alpha = r), and A and B have the same norms, as LoftQ's own are.

W is read, one module at a time, from the safetensors files of the folder the base was loaded
from (the tiny model's folder, a converted GGUF file's folder, or a hub model's cache), never
held whole in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import dequantized


class FullWeights:
    """The full-precision weights of a model folder's safetensors files, read per tensor."""

    def __init__(self, source: str, revision: str | None = None) -> None:
        folder = Path(source)
        if not folder.is_dir():  # a hub id: the files from_pretrained has already cached
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, revision=revision,
                                            allow_patterns=["*.safetensors", "*.json"]))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            files = sorted(folder.glob("*.safetensors"))
            self.files = {}
            for file in files:
                with safe_open(str(file), "pt") as f:
                    self.files.update({k: file for k in f.keys()})
        if not self.files:
            raise ValueError(f"lora.init=loftq needs the base's full-precision weights, and "
                             f"{folder} holds no .safetensors file")
        self.folder = folder

    def weight(self, path: str) -> torch.Tensor:
        """The float32 weight of the linear at module `path` (`<path>.weight`, or the same key
        without the model's leading prefix, as base-model checkpoints store it)."""
        from safetensors import safe_open

        key = f"{path}.weight"
        if key not in self.files:
            key = key.split(".", 1)[1] if "." in key else key
        if key not in self.files:
            raise ValueError(f"lora.init=loftq: {path}.weight is not in the safetensors files "
                             f"of {self.folder}")
        with safe_open(str(self.files[key]), "pt") as f:
            return f.get_tensor(key).to(torch.float32)


class Residuals:
    """The quantization error of a loaded base's linears, as the leading part of its SVD, computed
    once per module and base: every LoftQ trial of the base (any rank, seed or pack) slices the
    same decomposition, so K trials cost one SVD per module, not K, and a trial's start does not
    depend on which trials came before it. What is kept is one adapter's worth per module: the
    top r components for the largest r asked so far (on the CPU)."""

    def __init__(self, source: str, revision: str | None = None) -> None:
        self.full = FullWeights(source, revision)
        self._svd: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def factors(self, path: str, layer: torch.nn.Module, r: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """LoftQ's (A, B) for a rank-`r` adapter scaled by `scale` on the linear at `path`."""
        cached = self._svd.get(path)
        k = 0 if cached is None else cached[1].shape[0]
        if cached is None or (k < r and k < min(layer.in_features, layer.out_features)):
            q = dequantized(layer)
            residual = self.full.weight(path).to(q.device) - q
            u, s, vh = torch.linalg.svd(residual, full_matrices=False)
            cached = (u[:, :r].cpu(), s[:r].cpu(), vh[:r].cpu())
            self._svd[path] = cached
        return loftq_factors(cached, r, scale)


def loftq_factors(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], r: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), r x in and out x r, with scale B A the best rank-r approximation of the matrix
    whose (leading) SVD is `svd` = (U, S, V^T)."""
    u, s, vh = svd
    root = (s[:r] / scale).sqrt()
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    if a.shape[0] < r:  # rank above min(out, in): the extra directions start at zero
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    return a.contiguous(), b.contiguous()


def residual_error(full: torch.Tensor, layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor,
                   scale: float) -> float:
    """||W - (dequant(Q) + scale B A)||_F: what LoftQ makes small (0 adapter: the quantization
    error alone)."""
    approx = dequantized(layer) + scale * (b.to(torch.float32) @ a.to(torch.float32))
    return float(torch.linalg.matrix_norm(full.to(approx.device) - approx))
