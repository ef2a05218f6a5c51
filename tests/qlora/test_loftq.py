"""LoftQ initialisation: the adapter starts at the best rank-r fit of the base's quantization
error, on the pack's one shared quantized base."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from support.engine import DATA, make_base

from qlora import TrialSpec, adapter_logits, train_pack, write_adapter
from qlora.adapters import adapter_layers, inject, load_adapter_state, remove
from qlora.base import dequantized
from qlora.export import PEFT_PREFIX, WEIGHTS_NAME, dequantized_model, merge_adapter
from qlora.loftq import FullWeights, residual_error


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


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merged_loftq_adapter_is_q_plus_scale_b_a(data, tmp_path, quant):
    """`orchestrator.export --merge` merges into the dequantized base: Q + scale B A, which is
    what LoftQ's adapter was fitted against (merged into W it would count the error twice).
    On NF4 the merged model gives the engine's logits; int8's own forward also rounds the
    activations (LLM.int8), so there its merged weights are compared instead."""
    base = make_base(gc=False, quant=quant)
    trial = TrialSpec(trial_id="m", seed=1, r=8, alpha=16.0, init="loftq", learning_rate=1e-2,
                      max_steps=3, micro_batch_size=2, optimizer="adamw", data=DATA)
    result = train_pack(base, [trial], datasets=data)[0]
    folder = write_adapter(result.adapter, tmp_path / "adapter")
    inject(base, "check", trial)
    load_adapter_state(base, "check", {k[len(PEFT_PREFIX):]: v for k, v in
                                       load_safetensors((folder / WEIGHTS_NAME).read_bytes()).items()})
    plain = dequantized_model(make_base(gc=False, quant=quant), torch.float32)  # as export loads
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = plain(input_ids=ids).logits
        merged = merge_adapter(plain, folder)
        after = merged(input_ids=ids).logits
    for path, layer in adapter_layers(base, "check").items():
        ad = layer.adapters["check"]
        want = dequantized(layer.base_layer) + ad.scale * (ad.lora_B.weight @ ad.lora_A.weight)
        assert torch.allclose(merged.get_submodule(path).weight, want, atol=1e-5), path
    if quant == "nf4":
        ours = adapter_logits(base, "check", ids).float()
        scale = ours.abs().max()
        assert ((after - ours).abs().max() / scale).item() <= 1e-4
        assert ((before - ours).abs().max() / scale).item() > 1e-2  # the adapter matters
    remove(base, "check")


def test_loftq_trials_share_one_svd_per_module_and_start_as_alone():
    """K LoftQ trials of a base cost one SVD per module (kept for the largest rank asked), and a
    trial's start is the same whether its base computed the SVD for it or for a larger rank."""
    base = make_base(gc=False)
    inject(base, "big", TrialSpec(trial_id="big", r=16, init="loftq"))
    inject(base, "small", TrialSpec(trial_id="small", r=4, alpha=8.0, init="loftq"))
    kept = base._residuals._svd
    assert len(kept) == 14 and {s.shape[0] for _, s, _ in kept.values()} == {16}
    fresh = make_base(gc=False)
    inject(fresh, "small", TrialSpec(trial_id="small", r=4, alpha=8.0, init="loftq"))
    assert {s.shape[0] for _, s, _ in fresh._residuals._svd.values()} == {4}
    for path, layer in adapter_layers(fresh, "small").items():
        mine, theirs = layer.adapters["small"], base.layers[path].adapters["small"]
        assert torch.equal(mine.lora_A.weight, theirs.lora_A.weight)
        assert torch.equal(mine.lora_B.weight, theirs.lora_B.weight)
