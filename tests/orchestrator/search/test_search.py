"""Search: grid order and size, stable trial ids, readable names, reproducible random draws."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from orchestrator.config.compose import compose
from orchestrator.config.errors import ConfigError
from orchestrator.config.validate import validate
from orchestrator.search.expand import expand
from orchestrator.search.params import normalize
from orchestrator.search.trials import apply, fmt_number, trial_id, trial_seed


@functools.cache
def _config(*overrides: str):
    """The validated config of `overrides` (cached: composing costs ~0.1 s; nothing mutates it)."""
    return normalize(validate(compose(list(overrides))))


def _random(seed: int, num_trials: int, params: str):
    return _config("sweep=random", f"seed={seed}", f"sweep.num_trials={num_trials}",
                   "~sweep.params", f"+sweep.params={params}")


@pytest.mark.parametrize(("sweep", "size"), [
    ("single", 1), ("rank_grid", 4), ("alpha_grid", 4), ("lr_grid", 5), ("grid", 12), ("random", 8),
])
def test_sweep_sizes(sweep, size):
    assert len(expand(_config(f"sweep={sweep}"))) == size


def test_grid_is_the_cartesian_product_in_yaml_order():
    cfg = _config("sweep=grid")
    trials = expand(cfg)
    p = cfg.sweep.params
    assert list(p) == ["lora.r", "lora.alpha", "train.learning_rate"]
    expected = [dict(zip(p, v, strict=True)) for v in itertools.product(*p.values())]
    assert [t.params for t in trials] == expected  # the last key varies fastest
    assert [t.spec.r for t in expand(_config("sweep=rank_grid"))] == [4, 8, 16, 32]


def test_trial_carries_its_config_and_specs():
    cfg = _config("sweep=grid")
    for t in expand(cfg):
        assert t.config.lora.r == t.params["lora.r"] == t.spec.r
        assert t.spec.alpha == t.params["lora.alpha"] == t.config.lora.alpha
        assert t.spec.learning_rate == t.params["train.learning_rate"]
        assert t.spec.trial_id == t.trial_id == trial_id(t.config)
        assert t.spec.name == t.name
        assert t.spec.seed == trial_seed(cfg.seed, t.trial_id)
        assert 0 <= t.spec.seed < 2**31
        assert t.spec.max_steps == cfg.train.max_steps and t.spec.data.seq_len == cfg.train.seq_len
        assert t.base == cfg.base_spec()
    assert len({t.spec.seed for t in expand(cfg)}) == 12


def test_same_config_has_the_same_id_in_any_sweep():
    ids = {
        sweep: {t.name: t.trial_id for t in expand(_config(f"sweep={sweep}"))}
        for sweep in ("single", "rank_grid", "alpha_grid", "lr_grid")
    }
    shared = ids["single"]["r16-a32-lr2e-3"]
    assert ids["rank_grid"]["r16-a32-lr2e-3"] == shared
    assert ids["alpha_grid"]["r16-a32-lr2e-3"] == shared
    assert ids["lr_grid"]["r16-a32-lr2e-3"] == shared
    # and the same id for the same values given another way
    assert trial_id(_config("lora.alpha=32.0", "train.learning_rate=0.002")) == shared


@functools.cache
def _defaults() -> dict:
    return OmegaConf.to_container(compose([]), resolve=True)


def _tweak(override: str):
    """The default config with one `key=value` set: like `_config(override)`, without Hydra's cost."""
    key = override.partition("=")[0]
    value = OverridesParser.create().parse_override(override).value()  # Hydra's own parsing
    data = copy.deepcopy(_defaults())
    *sections, leaf = key.split(".")
    node = data
    for section in sections:
        node = node[section]
    node[leaf] = value
    return normalize(validate(data))


def test_tweak_matches_hydra():
    for override in ("lora.r=8", "train.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]"):
        assert _tweak(override) == _config(override)


@pytest.mark.parametrize("override", [
    "model.name_or_path=org/other", "model.revision=v2", "data.path=train.jsonl",
    "data.eval_fraction=0.2", "data.format=alpaca", "data.train_on_prompt=true",
    "quant.type=fp4", "quant.double_quant=false", "quant.compute_dtype=bfloat16",
    "lora.r=8", "lora.alpha=16", "lora.dropout=0.1", "lora.target_modules=[q_proj,v_proj]",
    "train.learning_rate=1e-4", "train.max_steps=61", "train.seq_len=64",
    "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.optimizer=adamw",
    "train.weight_decay=0.01", "train.warmup_steps=5", "train.lr_schedule=linear",
    "train.max_grad_norm=0.5", "train.eval_every=10", "seed=1", "data.split=test",
    "data.name=other", "data.revision=v1",
    "data.mix=[{path: a.jsonl}, {path: b.jsonl, weight: 2}]",
])
def test_id_changes_with_every_result_affecting_key(override):
    assert trial_id(_tweak(override)) != trial_id(_config())


@pytest.mark.parametrize("override", [
    "pack.max_adapters=1", "cluster.num_workers=3", "cluster.gpus_per_worker=0",
    "cluster.max_retries=0", "tracking.uri=sqlite:///other.db", "tracking.experiment=x",
    "sweep.name=other", "resume=true", "output_dir=elsewhere", "dry_run=true",
    "train.gradient_checkpointing=true", "train.activation_offload=true",
])
def test_id_ignores_where_and_how_a_trial_runs(override):
    assert trial_id(_tweak(override)) == trial_id(_config())


def test_names():
    assert [t.name for t in expand(_config("sweep=rank_grid"))] == [
        "r4-a32-lr2e-3", "r8-a32-lr2e-3", "r16-a32-lr2e-3", "r32-a32-lr2e-3"]
    assert [t.name for t in expand(_config("sweep=lr_grid"))] == [
        "r16-a32-lr2e-4", "r16-a32-lr5e-4", "r16-a32-lr1e-3", "r16-a32-lr2e-3", "r16-a32-lr5e-3"]
    dropout = expand(_config("++sweep.params={lora.dropout: [0.0, 0.1]}", "seed=3"))
    assert [t.name for t in dropout] == ["r16-a32-lr2e-3-do0", "r16-a32-lr2e-3-do0.1"]


def test_equal_names_get_the_id_appended():
    trials = expand(_config("++sweep.params={train.learning_rate: [2e-4, 2.0001e-4]}"))
    assert [t.name for t in trials] == [f"r16-a32-lr2e-4-{t.trial_id[:6]}" for t in trials]
    assert len({t.name for t in trials}) == 2


@pytest.mark.parametrize(("x", "text"), [
    (32.0, "32"), (16, "16"), (0.05, "0.05"), (0.5, "0.5"), (2e-4, "2e-4"), (1e-3, "1e-3"),
    (5e-5, "5e-5"), (1.5e-5, "1.5e-5"), (0.0, "0"), (3e-4, "3e-4"),
])
def test_number_format(x, text):
    assert fmt_number(x) == text


def test_duplicate_grid_values_are_one_trial():
    assert len(expand(_config("++sweep.params={lora.r: [8, 8, 16]}"))) == 2


def test_random_is_reproducible_with_a_seed():
    def params(seed):
        return [t.params for t in expand(_config("sweep=random", f"seed={seed}"))]

    assert params(0) == params(0)
    assert params(0) != params(1)
    # the sweep seed also enters every trial's id, so both sweeps' trials differ
    first = {t.trial_id for t in expand(_config("sweep=random", "seed=0"))}
    assert first.isdisjoint(t.trial_id for t in expand(_config("sweep=random", "seed=1")))


def test_random_ranges_are_respected_and_log_uniform():
    cfg = _random(7, 400, "{train.learning_rate: {low: 1e-5, high: 1e-1, log: true}, "
                          "lora.r: {low: 2, high: 64, type: int}, lora.dropout: [0.0, 0.05]}")
    trials = expand(cfg)
    assert len(trials) > 350  # a few draws may repeat
    lrs = [t.params["train.learning_rate"] for t in trials]
    assert all(1e-5 <= lr <= 1e-1 for lr in lrs)
    # log-uniform: half the draws below the geometric middle (1e-3); uniform would give ~1 %
    below = sum(lr < 1e-3 for lr in lrs) / len(lrs)
    assert 0.35 < below < 0.65
    ranks = [t.params["lora.r"] for t in trials]
    assert all(isinstance(r, int) and 2 <= r <= 64 for r in ranks)
    assert {t.params["lora.dropout"] for t in trials} == {0.0, 0.05}
    # log-uniform over decades: every decade gets about a quarter of the draws
    for decade in range(-5, -1):
        share = sum(10.0**decade <= lr < 10.0 ** (decade + 1) for lr in lrs) / len(lrs)
        assert 0.15 < share < 0.35, (decade, share)
    assert all(math.isclose(lr, float(f"{lr:.4g}")) for lr in lrs)  # readable values


def test_random_draws_that_repeat_are_kept_once():
    assert len(expand(_random(0, 20, "{lora.r: [8, 16]}"))) == 2


def test_swept_values_are_checked_like_the_keys():
    with pytest.raises(ConfigError, match=r"^sweep\.params\.lora\.r: must be an integer in 1\.\.1024"):
        _config("++sweep.params={lora.r: [4, 0]}")
    with pytest.raises(ConfigError, match=r"^sweep\.params\.train\.learning_rate\.high: "):
        _random(0, 2, "{train.learning_rate: {low: 1e-5, high: 2.0, log: true}}")


def test_apply_sets_dotted_keys_without_touching_the_input():
    cfg = _config()
    other = apply(cfg, {"lora.r": 4, "train.learning_rate": 1e-3, "seed": 9})
    assert (other.lora.r, other.train.learning_rate, other.seed) == (4, 1e-3, 9)
    assert (cfg.lora.r, cfg.train.learning_rate, cfg.seed) == (16, 2e-3, 0)


@pytest.mark.slow
def test_random_search_logs_the_params_it_ran(ray_session, tmp_path):
    import dataclasses

    from support import tiny_sweeps

    from orchestrator.config.schema import SweepDef

    sweep = SweepDef(name="random_t", strategy="random", num_trials=2, params={
        "lora.r": [4, 8],
        "train.learning_rate": {"low": 1e-4, "high": 3e-3, "log": True, "type": "float"},
        "lora.dropout": {"low": 0.0, "high": 0.2, "type": "float"}})
    cfg = tiny_sweeps.config(tmp_path, sweep)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=2, eval_every=0))
    run = tiny_sweeps.run(tmp_path, cfg)
    assert run.exit_code == 0
    assert tiny_sweeps.assert_params_are_what_ran(run) == 2
