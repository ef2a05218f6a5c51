"""LoftQ initialisation: the adapter starts at the best rank-r fit of the base's quantization
error, on the pack's one shared quantized base."""

from __future__ import annotations

import pytest
import torch
from support.engine import make_base

from qlora import TrialSpec
from qlora.adapters import adapter_layers, inject, remove
from qlora.loftq import FullWeights, dequantized, residual_error


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_loftq_fits_the_quantization_error_better_than_gaussian_init(quant):
    base = make_base(gc=False, quant=quant)
    full = FullWeights(base.source)
    r, alpha = 8, 32.0
    inject(base, "gauss", TrialSpec(trial_id="g", r=r, alpha=alpha))
    inject(base, "loftq", TrialSpec(trial_id="l", r=r, alpha=alpha, init="loftq"))
    layers = adapter_layers(base, "loftq")
    assert len(layers) == 14  # every linear of the tiny model's two blocks
    gains = []
    for path, layer in layers.items():
        w = full.weight(path)
        errors = {}
        for slot in ("gauss", "loftq"):
            ad = layer.adapters[slot]
            errors[slot] = residual_error(w, layer.base_layer, ad.lora_A.weight.detach(),
                                          ad.lora_B.weight.detach(), ad.scale)
        # Gaussian init starts with B = 0: the error is the quantization error itself.
        q_error = float(torch.linalg.matrix_norm(w - dequantized(layer.base_layer)))
        assert errors["gauss"] == pytest.approx(q_error, rel=1e-6)
        # LoftQ reaches the rank-r optimum (Eckart-Young): the tail of the residual's spectrum.
        tail = torch.linalg.svdvals(w - dequantized(layer.base_layer))[r:].square().sum().sqrt()
        assert errors["loftq"] == pytest.approx(float(tail), rel=1e-4)
        assert errors["loftq"] < errors["gauss"]
        gains.append(1 - errors["loftq"] / errors["gauss"])
    # Rank 8 of 128-wide matrices takes a real share of the error off every layer.
    assert min(gains) > 0.05, gains
    # A and B are balanced (LoftQ's split), not all of the residual in one factor.
    ad = layers["model.layers.0.self_attn.q_proj"].adapters["loftq"]
    assert torch.allclose(ad.lora_A.weight.norm(), ad.lora_B.weight.norm(), rtol=1e-4)
    remove(base, "gauss")
    remove(base, "loftq")


def test_loftq_is_refused_on_a_16_bit_base():
    base = make_base(gc=False, quant="none")
    with pytest.raises(ValueError, match="lora.init=loftq needs a quantized base"):
        inject(base, "x", TrialSpec(trial_id="x", init="loftq"))


def test_loftq_iter_is_one_on_a_shared_base():
    with pytest.raises(ValueError, match="loftq_iter must be 1, got 2"):
        TrialSpec(trial_id="x", init="loftq", loftq_iter=2)
