"""The training knobs of the config: what a trial records is what it trains, resume=PATH."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.config.compose import compose
from orchestrator.config.errors import ConfigError
from orchestrator.config.validate import validate
from orchestrator.search.expand import expand
from orchestrator.search.resume_trial import resume_config
from orchestrator.tracking.keys import trial_params
from qlora import checkpoint
from qlora.base import load_tokenizer
from qlora.data import load_data


def _trials(*overrides: str):
    return expand(validate(compose(list(overrides))))


def test_epochs_and_warmup_ratio_are_recorded_as_trained():
    [trial] = _trials("train.num_epochs=0.5", "train.warmup_ratio=0.1",
                      "train.micro_batch_size=4", "train.grad_accum_steps=2")
    rows = len(load_data(trial.spec.data, load_tokenizer(trial.base)).train)
    steps = math.ceil(0.5 * rows / 8)
    assert trial.config.train.max_steps == trial.spec.max_steps == steps
    assert trial.spec.resolved(rows).max_steps == steps  # what the engine resolves on the worker
    assert trial.config.train.warmup_steps == trial.spec.warmup == math.ceil(0.1 * steps)
    params = trial_params(trial)
    assert (params["train_max_steps"], params["train_warmup_steps"]) == (
        str(steps), str(math.ceil(0.1 * steps)))
    assert (params["train_num_epochs"], params["train_warmup_ratio"]) == ("0.5", "0.1")
    # The epochs decide the steps: the model file's max_steps does not enter the trial's id.
    [other] = _trials("model=smollm2_135m", "model.name_or_path=tiny", "train.learning_rate=2e-3",
                      "train.seq_len=128", "train.eval_every=20", "quant.compute_dtype=float32",
                      "train.num_epochs=0.5", "train.warmup_ratio=0.1",
                      "train.micro_batch_size=4", "train.grad_accum_steps=2")
    assert other.config.train.max_steps == steps and other.trial_id == trial.trial_id


def test_lora_knobs_reach_the_spec_and_sweep():
    trials = _trials("++sweep.params={lora.use_rslora: [false, true], "
                     "lora.rank_pattern: [{}, {q_proj: 4}]}")
    assert len({t.trial_id for t in trials}) == 4 and len({t.name for t in trials}) == 4
    assert all("\\" not in t.name and "/" not in t.name for t in trials)
    for t in trials:
        assert t.spec.use_rslora == t.params["lora.use_rslora"]
        assert dict(t.spec.rank_pattern) == t.params["lora.rank_pattern"]
        assert t.spec.rank_of("model.layers.0.self_attn.q_proj") == (
            4 if t.params["lora.rank_pattern"] else 16)
    # Defaults leave the ids of earlier configs as they were (resume=true finds their runs).
    [plain] = _trials()
    assert plain.trial_id == "7d42af8817db"


def test_resume_path_continues_that_trial_alone(tmp_path):
    trials = _trials("sweep=rank_grid")
    chosen = trials[2]
    param = torch.nn.Parameter(torch.zeros(2))
    folder = checkpoint.save(tmp_path / "run1", chosen.trial_id, {"w": torch.zeros(2)},
                             torch.optim.AdamW([param]),
                             {"step": 4, "trial_id": chosen.trial_id}).parent
    config = resume_config(validate(compose(["sweep=rank_grid", f"resume={folder}"])))
    [again] = expand(config)
    assert again.trial_id == chosen.trial_id and again.spec.r == chosen.spec.r
    assert config.sweep.name == "rank_grid" and config.resume == str(folder.resolve())
    with pytest.raises(ConfigError, match="not a trial of this config"):  # other settings
        resume_config(validate(compose(["sweep=rank_grid", "lora.alpha=8", f"resume={folder}"])))
