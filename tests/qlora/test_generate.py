"""Generation during evaluation: packed greedy answers equal PEFT's alone; metrics computed exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as load_safetensors
from support.engine import DEVICE, make_base

from qlora import DataSpec, TrialSpec, train_pack, write_adapter
from qlora.adapters import inject, load_adapter_state, remove
from qlora.data import load_data
from qlora.export import PEFT_PREFIX, WEIGHTS_NAME
from qlora.generate import SAMPLES, greedy, judge, prompt_and_reference
from qlora.metrics import exact_match, load_metric, score, token_f1

DATA = DataSpec(seq_len=64, max_eval_examples=16)
USER = "support.user_metric:shared_chars"


def _trials(eval_samples: int = 0, steps: int = 8) -> list[TrialSpec]:
    # Different ranks and learning rates, trained enough that their answers differ.
    return [TrialSpec(trial_id=f"g{r}", seed=r, r=r, alpha=2.0 * r, learning_rate=lr,
                      max_steps=steps, micro_batch_size=4, optimizer="adamw", dropout=0.0,
                      eval_samples=eval_samples, eval_max_new_tokens=12, eval_metric=USER,
                      data=DATA)
            for r, lr in ((4, 2e-2), (8, 1e-2), (16, 5e-3))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base, trials, adapter folders, eval examples): 3 adapters trained on the bundled data."""
    base = make_base(gc=False)
    trials = _trials()
    results = {r.trial_id: r for r in train_pack(base, trials)}
    root = tmp_path_factory.mktemp("adapters")
    folders = {t.trial_id: write_adapter(results[t.trial_id].adapter, root / t.trial_id)
               for t in trials}
    return base, trials, folders, load_data(DATA, base.tokenizer).eval


def test_packed_greedy_equals_peft_generate_alone(trained):
    from peft import PeftModel

    base, trials, folders, eval_examples = trained
    prompts = [prompt_and_reference(ex)[0] for ex in eval_examples[:6]]
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths share the batch
    for t in trials:
        weights = load_safetensors((folders[t.trial_id] / WEIGHTS_NAME).read_bytes())
        inject(base, t.trial_id, t)
        load_adapter_state(base, t.trial_id, {k[len(PEFT_PREFIX):]: v for k, v in weights.items()})
    try:
        packed = greedy(base, [(t.trial_id, prompts) for t in trials], max_new_tokens=12)
    finally:
        for t in trials:
            remove(base, t.trial_id)
    eos = base.tokenizer.eos_token_id

    fresh = make_base(gc=False)
    for t, ours in zip(trials, packed, strict=True):
        peft_model = PeftModel.from_pretrained(fresh.model, str(folders[t.trial_id])).eval()
        for prompt, answer in zip(prompts, ours, strict=True):
            ids = torch.tensor([prompt], device=DEVICE)
            with torch.no_grad():
                out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=12, do_sample=False, use_cache=True,
                                          eos_token_id=eos, pad_token_id=base.tokenizer.pad_token_id)
            theirs = out[0, len(prompt):].tolist()
            theirs = theirs[:theirs.index(eos)] if eos in theirs else theirs
            assert answer == theirs, (t.trial_id, base.tokenizer.decode(prompt))
        fresh.model = peft_model.unload()  # the plain base again for the next adapter
    assert packed[0] != packed[1] != packed[2]  # the adapters matter
    assert any(answer for answers in packed for answer in answers)


def test_pack_reports_scores_and_samples_as_alone(trained):
    base, _, _, eval_examples = trained
    seen: dict[str, list[dict]] = {}

    def on_metrics(trial_id, step, metrics):
        if "eval_loss" in metrics:
            seen.setdefault(trial_id, []).append(metrics)

    trials = _trials(eval_samples=5, steps=4)
    packed = {r.trial_id: r for r in train_pack(base, trials, on_metrics=on_metrics)}
    alone = {t.trial_id: train_pack(base, [t])[0] for t in trials[:1]}
    t = trials[0].trial_id
    assert packed[t].samples == alone[t].samples
    for r in packed.values():
        final = seen[r.trial_id][-1]
        assert set(final) == {"eval_loss", "eval_exact_match", "eval_token_f1",
                              "eval_shared_chars", SAMPLES}
        samples = final[SAMPLES]
        assert len(samples) == 5 and r.samples == samples
        refs = [base.tokenizer.decode(prompt_and_reference(ex)[1], skip_special_tokens=True)
                for ex in eval_examples[:5]]
        assert [s["reference"] for s in samples] == refs
        for s in samples:  # per-row scores are the metric functions of the row's own texts
            assert s == {**s, **score(s["prediction"], s["reference"],
                                      {"shared_chars": load_metric(USER)})}
        assert final["eval_exact_match"] == sum(s["exact_match"] for s in samples) / 5
        assert final["eval_shared_chars"] == sum(s["shared_chars"] for s in samples) / 5
        assert r.eval_metrics == {k: v for k, v in final.items() if k != SAMPLES}


def test_judge_skips_trials_without_samples(trained):
    base, _, _, eval_examples = trained
    spec = TrialSpec(trial_id="none", eval_samples=0)
    inject(base, "none", spec)
    try:
        assert judge(base, [("none", eval_examples, spec)]) == [({}, [])]
    finally:
        remove(base, "none")


@pytest.mark.parametrize("prediction, reference, em, f1", [
    ("f-k-h-g", "f-k-h-g", 1.0, 1.0),
    ("  f-k-h-g\n", "f-k-h-g", 1.0, 1.0),  # stripped
    ("New   York\tcity", "New York city", 1.0, 1.0),  # whitespace runs collapse
    ("new york city", "New York city", 0.0, 1.0),  # case counts for EM, not for F1
    ("NEWYORK", "newyork", 0.0, 1.0),
    ("New York", "New York city", 0.0, 0.8),  # p = 1, r = 2/3
    ("the the cat", "the cat", 0.0, 0.8),  # multiset overlap 2: p = 2/3, r = 1
    ("dog", "cat", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("", "cat", 0.0, 0.0),
])
def test_metrics_on_hand_made_cases(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1, abs=1e-12)


@pytest.mark.parametrize("path, says", [
    ("no_colon", "package.module:function"),
    ("support.user_metric:", "package.module:function"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("support.user_metric:missing", "has no attribute 'missing'"),
    ("support.user_metric:__doc__", "is not callable"),
])
def test_bad_metric_paths_say_why(path, says):
    with pytest.raises(ValueError, match=says):
        load_metric(path)
