"""GGUF files as input: a tiny Llama written by the `gguf` package itself converts to a folder
whose logits equal the original weights'; bad files are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlora.base import load_base
from qlora.config import BaseSpec
from qlora.models import ModelError, check_gguf, converted_path, gguf_file, gguf_source

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False)


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: every byte as one printable character (the BPE base vocab)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = dict.fromkeys(range(256)), 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved for its rope kernel (convert_hf_to_gguf's permute).
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_tiny_gguf(path):
    """A random tiny Llama as llama.cpp's converter writes it (F32 tensors, a byte-level BPE
    vocab); returns the original model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = _byte_tokens() + ["<s>", "</s>"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), bos_token_id=256,
                                         eos_token_id=257, **CONFIG)).eval()
    c = CONFIG
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(c["hidden_size"] // c["num_attention_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3])
    w.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives them (none) from these
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, p in model.state_dict().items():
        a = p.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", a)
        else:
            _, _, i, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                a = _permute(a, c["num_attention_heads"])
            elif module == "self_attn.k_proj":
                a = _permute(a, c["num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{names[module]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_converts_to_the_same_logits(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    path, original = tiny_gguf
    folder = converted_path(path)
    assert gguf_source(folder)["gguf_file"] == str(path.resolve())
    assert converted_path(path) == folder  # cached: the second call converts nothing

    # The folder loads through the engine's own path, as any model does.
    base = load_base(BaseSpec(name_or_path=str(path), quant_type="none",
                              compute_dtype="float32", gradient_checkpointing=False), "cpu")
    assert base.source == str(folder)
    ids = base.tokenizer("Hello, GGUF world!", return_tensors="pt").input_ids
    assert ids.shape[1] == len(b"Hello, GGUF world!")  # no merges: one token per byte
    with torch.no_grad():
        got, want = base.model(ids).logits, original(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # A folder holding the file names it too, and a renamed copy reuses the converted folder.
    copy = tmp_path / "copy" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert gguf_file(str(copy.parent)) == copy
    assert converted_path(copy) == folder


def test_nf4_applies_to_a_converted_gguf(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    base = load_base(BaseSpec(name_or_path=str(tiny_gguf[0]), quant_type="nf4",
                              compute_dtype="float32"), "cpu")
    kinds = {type(m).__name__ for m in base.model.modules()}
    assert "Linear4bit" in kinds


def test_bad_gguf_files(tiny_gguf, tmp_path):
    raw = tiny_gguf[0].read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelError, match="not a complete GGUF file"):
        check_gguf(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(raw[:64])
    with pytest.raises(ModelError, match="not a complete GGUF file"):
        check_gguf(header_only)
    text = tmp_path / "model.gguf"
    text.write_text("not a model\n")
    with pytest.raises(ModelError, match="not a GGUF file"):
        check_gguf(text)
    with pytest.raises(ModelError, match="no such file"):
        check_gguf(tmp_path / "absent.gguf")
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(raw)
    (two / "b.gguf").write_bytes(raw)
    with pytest.raises(ModelError, match="holds 2 GGUF files"):
        gguf_file(str(two))
