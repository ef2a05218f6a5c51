"""The `tiny` model: a small Llama built from a config with a fixed seed, no download.

It is saved to a cache folder once and then loaded through exactly the same
`AutoModelForCausalLM.from_pretrained(path, quantization_config=...)` path as a real model, so
tests and the default sweep exercise the real bitsandbytes quantization.

Shapes are chosen so that every quantized linear holds a multiple of 64 * 256 weights: NF4's
blocks (64) and double quantization's blocks of block constants (256) then divide evenly and the
storage cost per weight is exactly 4 + 8/64 + 32/(64*256) bits.

The tokenizer is character level (printable ASCII, newline, and four special tokens), built with
the `tokenizers` library and saved beside the weights, with a small chat template.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

from .config import stable_hash

TINY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_SEED = 1234
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space, then newline
#: A minimal chat template: one line per turn, the assistant's turn closed by eos.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ 'assistant: ' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
_VERSION = 1  # bump when anything above changes, so stale caches are rebuilt


def cache_root() -> Path:
    """Where built models live: $QLORA_CACHE, else ~/.cache/qlora-orchestrator."""
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora-orchestrator"))


def tiny_model_path(**overrides) -> Path:
    """The folder of the tiny model, built on first use (atomically, safe across processes).

    `overrides` change `TINY_CONFIG` entries (e.g. `hidden_size=512, num_hidden_layers=4` for the
    benchmarks' wider shape); each distinct config is its own cached folder.
    """
    config = {**TINY_CONFIG, **overrides}
    key = stable_hash({"config": config, "seed": TINY_SEED, "chars": CHARS, "v": _VERSION}, 8)
    return build_once(cache_root() / f"tiny-llama-{key}", lambda tmp: _build(tmp, config),
                      lambda p: (p / "config.json").exists() and (p / "tokenizer.json").exists())


def build_once(out: Path, build, ready) -> Path:
    """The cache folder `out`, built by `build(tmp_folder)` unless `ready(out)` already holds.

    Built in a temporary folder beside it, then renamed into place: atomic, so a reader never
    sees half a folder, and safe when several processes race (the loser's copy is dropped).
    """
    if ready(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not ready(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tokenizer():
    """The tiny model's character-level tokenizer as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    # BPE with no merges over the raw string is exactly a character tokenizer.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build(folder: Path, shape: dict) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    gen = torch.Generator().manual_seed(TINY_SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    # Re-draw every weight from our own generator so the model does not depend on the global RNG
    # or on transformers' init order between versions.
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 if "embed" in name else 1.0 / p.shape[-1] ** 0.5, generator=gen)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
