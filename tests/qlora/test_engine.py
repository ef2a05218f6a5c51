"""The engine's promises: packed equals alone, isolation, PEFT round trip, storage, backfill."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as load_safetensors
from support.engine import DATA, DEVICE, by_id, curve, make_base, max_rel

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
from qlora.export import PEFT_PREFIX
from qlora.memory import measured_bits_per_weight

#: Per-module ranks and alphas (PEFT's patterns): q_proj rank 2 everywhere, layer 1's down_proj
#: rank 12, so one layer holds adapters of ranks 2, 4, 16 and 2 (or 12, 4, 16, 2) in a pack.
RANKS = {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 12}
ALPHAS = {"q_proj": 3.0, "v_proj": 40.0}


def _trials(steps: int = 20) -> list[TrialSpec]:
    # Different rank, alpha, learning rate, accumulation, optimizer: nothing shared but the base;
    # and the knobs that change a trial's recipe: rsLoRA, per-module ranks and alphas, warmup as
    # a ratio, and a length in epochs (64 train rows, micro batch 2: `steps` steps).
    settings = [(4, 8.0, 1e-3, 1, "paged_adamw_32bit"), (8, 16.0, 3e-3, 2, "adamw"),
                (16, 8.0, 5e-4, 1, "paged_adamw_8bit"), (2, 4.0, 2e-3, 1, "adamw")]
    # Two of them start from LoftQ (per-module ranks included): inits mix in one pack.
    knobs = [dict(use_rslora=True, warmup_steps=2),
             dict(rank_pattern=RANKS, alpha_pattern=ALPHAS, warmup_steps=2, init="loftq"),
             dict(warmup_ratio=0.15, init="loftq"),
             dict(num_epochs=steps * 2 / 64, warmup_steps=2)]
    return [TrialSpec(trial_id=f"t{k}", seed=100 + k, r=r, alpha=a, learning_rate=lr,
                      grad_accum_steps=acc, optimizer=opt, micro_batch_size=2, dropout=0.1,
                      eval_every=10, data=DATA, **{"max_steps": steps, **knob})
            for k, ((r, a, lr, acc, opt), knob) in enumerate(zip(settings, knobs, strict=True))]


@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_packed_equals_alone(data, gc):
    base = make_base(gc)
    trials = _trials()
    packed = by_id(train_pack(base, trials, datasets=data))
    for trial in trials:
        alone = train_pack(base, [trial], datasets=data)[0]
        together = packed[trial.trial_id]
        assert together.status == alone.status == "finished"
        assert len(together.train_losses) == 20 and [s for s, _ in together.eval_history] == [10, 20]
        assert together.spec.max_steps == 20  # num_epochs resolved to the steps it ran
        assert max_rel(curve(together), curve(alone)) <= 1e-4
    # The trials really differ, so equality above is not equality of untrained adapters.
    finals = sorted(r.eval_loss for r in packed.values())
    assert finals[-1] - finals[0] > 1e-3


def test_diverging_trial_is_stopped_and_isolated(data):
    base = make_base(gc=False)
    healthy = _trials(steps=12)[:3]
    wild = TrialSpec(trial_id="wild", seed=7, r=8, alpha=1e30, learning_rate=1.0, max_steps=12,
                     micro_batch_size=2, optimizer="adamw", data=DATA)
    reference = by_id(train_pack(base, healthy, datasets=data))
    ended = []
    mixed = by_id(train_pack(base, [healthy[0], wild, *healthy[1:]], datasets=data,
                              on_trial_end=lambda r: ended.append(r.trial_id)))
    assert mixed["wild"].status == "diverged"
    assert mixed["wild"].reason.startswith(f"diverged at step {mixed['wild'].steps + 1}")
    assert mixed["wild"].adapter is None
    assert ended[0] == "wild"  # reported as soon as it happened, not at the end of the pack
    for trial in healthy:
        assert mixed[trial.trial_id].status == "finished"
        assert max_rel(curve(mixed[trial.trial_id]), curve(reference[trial.trial_id])) <= 1e-4


@pytest.mark.parametrize("knobs", [{}, dict(use_rslora=True),
                                   dict(rank_pattern=RANKS, alpha_pattern=ALPHAS),
                                   dict(init="loftq")],
                         ids=["lora", "rslora", "rank-alpha-pattern", "loftq"])
def test_peft_round_trip(data, tmp_path, knobs):
    from peft import PeftModel

    base = make_base(gc=False)
    trial = TrialSpec(trial_id="rt", seed=3, r=8, alpha=16.0, learning_rate=1e-2, max_steps=6,
                      micro_batch_size=2, optimizer="adamw", data=DATA, **knobs)
    result = train_pack(base, [trial], datasets=data)[0]
    folder = write_adapter(result.adapter, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16.0
    assert config["use_rslora"] == knobs.get("use_rslora", False)
    assert config["rank_pattern"] == knobs.get("rank_pattern", {})
    assert config["alpha_pattern"] == knobs.get("alpha_pattern", {})
    assert config["base_model_name_or_path"] == base.source
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj", "down_proj"}
    weights = load_safetensors((folder / "adapter_model.safetensors").read_bytes())
    assert all(k.startswith(PEFT_PREFIX) and k.endswith(("lora_A.weight", "lora_B.weight"))
               for k in weights)
    ranks = {k[len(PEFT_PREFIX):-len(".lora_A.weight")]: v.shape[0] for k, v in weights.items()
             if k.endswith("lora_A.weight")}
    assert ranks == {path: trial.rank_of(path) for path in ranks}
    assert (ranks["model.layers.1.mlp.down_proj"], ranks["model.layers.0.self_attn.q_proj"]) == (
        (12, 2) if "rank_pattern" in knobs else (8, 8))

    # The engine's logits with the exported weights, against PEFT's on a freshly loaded base.
    inject(base, "check", trial)
    load_adapter_state(base, "check", {k[len(PEFT_PREFIX):]: v for k, v in weights.items()})
    ids = torch.randint(4, 100, (3, 24), generator=torch.Generator().manual_seed(0))
    ours = adapter_logits(base, "check", ids).float().cpu()
    remove(base, "check")
    fresh = make_base(gc=False)
    with torch.no_grad():
        plain = fresh.model(input_ids=ids.to(fresh.device)).logits.float().cpu()
        peft_model = PeftModel.from_pretrained(fresh.model, str(folder)).eval()
        theirs = peft_model(input_ids=ids.to(fresh.device)).logits.float().cpu()
    # PEFT built the same per-module ranks and scales (alpha / r, or alpha / sqrt(r)).
    peft_layers = {n: m for n, m in peft_model.base_model.model.named_modules()
                   if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    assert len(peft_layers) == len(ranks)
    assert {n: m.scaling["default"] for n, m in peft_layers.items()} == pytest.approx(
        {n: trial.scale_of(n) for n in peft_layers})
    assert (ours - plain).abs().max() > 1e-3  # the adapter matters
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-4


@pytest.mark.parametrize("quant, double, expected", [
    ("nf4", False, 4.5),
    ("nf4", True, 4 + 8 / 64 + 32 / (64 * 256)),
    ("fp4", False, 4.5),
    ("fp4", True, 4 + 8 / 64 + 32 / (64 * 256)),
    ("int8", False, 8.0),
    ("none", False, 32.0),  # float32 compute on the CPU; 16 with bf16
])
def test_storage_bits_per_weight(quant, double, expected):
    import bitsandbytes as bnb

    base = load_base(BaseSpec(quant_type=quant, double_quant=double, compute_dtype="float32",
                              gradient_checkpointing=False), device=DEVICE)
    linears = [m for m in base.model.modules()
               if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert bool(linears) == (quant != "none")
    if quant in ("nf4", "fp4"):
        assert all(m.weight.quant_state.quant_type == quant for m in linears)
        assert all(m.weight.quant_state.blocksize == 64 for m in linears)
        assert all(m.weight.quant_state.nested == double for m in linears)
    assert measured_bits_per_weight(base.model) == pytest.approx(expected, abs=1e-9)


def test_import_qlora_leaves_orchestration_stack_out():
    code = ("import sys, qlora, qlora.train, qlora.data, qlora.memory; "
            "bad = [m for m in ('ray', 'mlflow', 'hydra', 'omegaconf', 'orchestrator') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_backfill_and_early_stop_keep_numbers(data):
    base = make_base(gc=False)
    trials = _trials(steps=8)
    queue = list(trials[2:])
    active_seen = []

    def on_metrics(trial_id, step, metrics):
        active_seen.append(trial_id)
        return trial_id == "t1" and step == 4  # stop t1 early: frees its slot for backfill

    model_before = base.model
    results = by_id(train_pack(base, trials[:2], datasets=data, on_metrics=on_metrics,
                                next_trial=lambda: queue.pop(0) if queue else None))
    assert base.model is model_before and not base.layers["model.layers.0.self_attn.q_proj"].adapters
    assert set(results) == {"t0", "t1", "t2", "t3"}
    assert results["t1"].status == "stopped" and results["t1"].steps == 4
    assert results["t1"].adapter is not None
    # t2 started when t1 stopped, alongside t0: never more than 2 trials at once.
    assert active_seen.index("t2") < active_seen.index("t3")
    for trial in (trials[0], trials[2], trials[3]):
        alone = train_pack(base, [trial], datasets=data)[0]
        assert max_rel(curve(results[trial.trial_id]), curve(alone)) <= 1e-4


def test_memory_estimate_matches_quantized_storage():
    import bitsandbytes as bnb

    from qlora.memory import estimate_memory

    spec = BaseSpec(compute_dtype="float32", gradient_checkpointing=True)
    base = load_base(spec, device="cpu")
    stored = 0
    for module in base.model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            stored += module.weight.numel() + qs.absmax.numel() + 4 * qs.state2.absmax.numel()
    stored += sum(p.numel() * p.element_size() for n, p in base.model.named_parameters()
                  if "proj" not in n)
    trials = _trials()
    est = estimate_memory(spec, trials, device_type="cpu")
    assert est.base == pytest.approx(stored, rel=0.01)
    assert est.adapters == 4 * sum(p.numel() for t in trials for p in inject(base, t.trial_id, t))
    no_gc = estimate_memory(BaseSpec(compute_dtype="float32", gradient_checkpointing=False),
                            trials, device_type="cpu")
    assert no_gc.activations > est.activations
    assert estimate_memory(spec, trials[:1], device_type="cpu").total < est.total


def test_memory_estimate_counts_the_longest_row_of_the_data_not_seq_len():
    from qlora.base import load_tokenizer
    from qlora.data import load_data
    from qlora.memory import estimate_memory, rows_of

    spec = BaseSpec(compute_dtype="float32", gradient_checkpointing=True)
    data_spec = DataSpec(seq_len=128)  # the bundled rows, tokenized for real (cached)
    tokenized = load_data(data_spec, load_tokenizer(spec))
    row = rows_of(tokenized)
    train = list(tokenized.train)
    assert row.tokens == max(len(e.input_ids) for e in train) < data_spec.seq_len
    assert row.kept == max(sum(x != -100 for x in e.labels) for e in train) < row.tokens
    trials = [dataclasses.replace(t, data=data_spec) for t in _trials()]
    full = estimate_memory(spec, trials, device_type="cpu")
    fitted = estimate_memory(spec, trials, device_type="cpu", rows={data_spec: row})
    assert fitted.activations == pytest.approx(
        full.activations * row.tokens / data_spec.seq_len, rel=1e-6)
    assert fitted.logits == full.logits * row.kept // data_spec.seq_len
    assert (fitted.base, fitted.optimizer) == (full.base, full.optimizer)


@pytest.mark.gpu
@pytest.mark.parametrize("gc", [False, True])
def test_packed_equals_alone_bf16_gpu(data, gc):
    base = make_base(gc, dtype="bfloat16")
    trials = _trials(steps=10)
    packed = by_id(train_pack(base, trials, datasets=data))
    for trial in trials:
        alone = train_pack(base, [trial], datasets=data)[0]
        assert max_rel(curve(packed[trial.trial_id]), curve(alone)) <= 2e-2


@pytest.mark.gpu
def test_peft_round_trip_bf16_gpu(data, tmp_path):
    from peft import PeftModel

    base = make_base(gc=True, dtype="bfloat16")
    trial = TrialSpec(trial_id="rt16", seed=3, r=8, alpha=16.0, learning_rate=1e-2, max_steps=4,
                      micro_batch_size=2, optimizer="paged_adamw_32bit", data=DATA)
    result = train_pack(base, [trial], datasets=data)[0]
    folder = write_adapter(result.adapter, tmp_path / "adapter")
    weights = load_safetensors((folder / "adapter_model.safetensors").read_bytes())
    inject(base, "check", trial)
    load_adapter_state(base, "check", {k[len(PEFT_PREFIX):]: v for k, v in weights.items()})
    ids = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = adapter_logits(base, "check", ids).float().cpu()
    fresh = make_base(gc=False, dtype="bfloat16")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(fresh.model, str(folder)).eval()(
            input_ids=ids.to(fresh.device)).logits.float().cpu()
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 2e-2


@pytest.mark.gpu
def test_storage_bits_bf16_gpu():
    base = load_base(BaseSpec(quant_type="none", compute_dtype="bfloat16"), device="cuda")
    assert measured_bits_per_weight(base.model) == pytest.approx(16.0)
    nf4 = load_base(BaseSpec(quant_type="nf4", compute_dtype="bfloat16"), device="cuda")
    assert measured_bits_per_weight(nf4.model) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-9)


def test_a_trial_with_no_eval_example_fails_instead_of_scoring_zero():
    """An empty eval split (none held out, or every eval row dropped at the trial's seq_len)
    once read as eval_loss 0.0, the best, and was crowned; it now fails that trial alone."""
    from support.engine import Tokenized, examples

    from qlora import DataSpec

    base = make_base(gc=False)
    empty = DataSpec(seq_len=48, eval_fraction=0.25)  # another spec: its own (empty) eval split
    judged = TrialSpec(trial_id="judged", seed=1, r=4, alpha=8.0, max_steps=2, eval_every=1,
                       micro_batch_size=2, data=DATA)
    blind = TrialSpec(trial_id="blind", seed=2, r=4, alpha=8.0, max_steps=2, eval_every=1,
                      micro_batch_size=2, data=empty)
    data = {DATA: Tokenized(examples(16, 0), examples(4, 1)), empty: Tokenized(examples(16, 0), [])}
    results = {r.trial_id: r for r in train_pack(base, [judged, blind], datasets=data)}
    assert results["blind"].status == "failed" and results["blind"].eval_loss is None
    assert "eval split holds no example" in results["blind"].reason
    assert results["blind"].adapter is None
    assert results["judged"].status == "finished" and results["judged"].eval_loss > 0
