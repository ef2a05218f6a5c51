"""Optuna: proposals from the seed and the results only, in rounds; a real sweep asks for them."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
from support import tiny_sweeps

from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import Config, OptunaCfg, SweepDef
from orchestrator.config.validate import validate
from orchestrator.search.expand import expand
from orchestrator.search.optuna_rounds import OptunaSearch, round_size
from orchestrator.search.trials import trial_id
from orchestrator.tracking.keys import EVAL_LOSS, STATUS_TAG, TRIAL_ID_TAG


def _config(seed: int = 0, num_trials: int = 12, batch: int = 4, startup: int = 4) -> Config:
    sweep = SweepDef(name="opt", strategy="optuna", num_trials=num_trials,
                     params=dict(tiny_sweeps.OPTUNA_SPACE),
                     optuna=OptunaCfg(startup_trials=startup, batch_size=batch))
    return validate(dataclasses.asdict(dataclasses.replace(Config(), sweep=sweep, seed=seed)))


def _objective(trial) -> float:
    """A deterministic stand-in for training: best near lr 2e-3 and a scale alpha/r of 4."""
    spec = trial.spec
    return (math.log(spec.learning_rate / 2e-3)) ** 2 + 0.1 * (math.log(spec.alpha / spec.r / 4)) ** 2


def _search(cfg: Config, shuffle_seed: int | None = None) -> list[str]:
    """Run a whole search against `_objective`, round by round; the trial ids it proposed."""
    search = OptunaSearch(cfg)
    while search.remaining:
        trials = search.ask(round_size(cfg))
        for t in trials:  # intermediate values, as a sweep reports them
            search.report(t.trial_id, 2, _objective(t) + 1.0)
        if shuffle_seed is not None:  # results arrive in any order within a round
            random.Random(shuffle_seed).shuffle(trials)
        for t in trials:
            search.tell(t.trial_id, "finished", _objective(t))
    return [t.trial_id for t in search.trials]


def test_the_same_seed_proposes_the_same_trials():
    first = _search(_config(seed=3))
    assert len(first) == len(set(first)) == 12
    assert _search(_config(seed=3)) == first
    assert _search(_config(seed=3), shuffle_seed=1) == first  # whichever worker finished first
    assert _search(_config(seed=4)) != first


def test_later_rounds_follow_the_results():
    cfg = _config(seed=3)
    search = OptunaSearch(cfg)
    first = search.ask(4)
    assert not search.ask(0) and search.waiting_for_results
    for t in first:
        search.tell(t.trial_id, "finished", _objective(t))
    second = search.ask(4)
    # TPE models the results: the second round sits closer to the optimum than random draws.
    assert min(_objective(t) for t in second) <= min(_objective(t) for t in first) * 1.5
    assert all(1e-4 <= t.spec.learning_rate <= 5e-3 and 8 <= t.spec.alpha <= 64
               and t.spec.r in (4, 8) for t in first + second)
    assert all(t.trial_id == trial_id(t.config) for t in first + second)


def test_repeats_are_told_and_the_budget_counts_distinct_trials():
    sweep = SweepDef(name="tiny", strategy="optuna", num_trials=5, params={"lora.r": [4, 8]},
                     optuna=OptunaCfg(startup_trials=1, batch_size=5))
    cfg = validate(dataclasses.asdict(dataclasses.replace(Config(), sweep=sweep)))
    search = OptunaSearch(cfg)
    trials = search.ask(5)
    assert sorted(t.spec.r for t in trials) == [4, 8]  # the space holds two trials only
    assert search.exhausted and search.remaining == 0


def test_dry_run_lists_the_first_round():
    cfg = _config(seed=3)
    assert [t.trial_id for t in expand(cfg)] == _search(cfg)[:4]


@pytest.mark.parametrize("override, key", [
    ({"strategy": "optuna"}, "sweep.num_trials"),
    ({"strategy": "optuna", "num_trials": 4, "optuna": {"batch_size": 0}},
     "sweep.optuna.batch_size"),
    ({"strategy": "optuna", "num_trials": 4, "optuna": {"startup_trials": -1}},
     "sweep.optuna.startup_trials"),
    ({"strategy": "bayes", "num_trials": 4}, "sweep.strategy"),
])
def test_bad_optuna_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate({"sweep": {"params": {"lora.r": [4, 8]}, **override}})
    assert err.value.key == key


@pytest.mark.slow
def test_a_sweep_asks_round_by_round_and_replays_from_its_results(optuna_run):
    """The sweep ran 2 rounds of 2 on one worker; replaying its results through a new search with
    the same seed proposes the very same trials: a second run with the same seed (and so the same
    results) proposes the same trials."""
    run = optuna_run
    assert run.exit_code == 0
    rows = run.summary["trials"]
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows)
    assert set(run.children) == {r["trial_id"] for r in rows}
    # Rounds: the first two trials started together, the next two only after both had ended.
    first, second = rows[:2], rows[2:]
    assert max(r["pack_ended"] for r in first) <= min(r["pack_started"] for r in second)
    assert len({r["placement"]["pid"] for r in rows}) == 1  # the same worker, its base kept
    replay = OptunaSearch(run.config)
    for batch in (first, second):
        asked = replay.ask(2)
        assert [t.trial_id for t in asked] == [r["trial_id"] for r in batch]
        for r in batch:
            child = run.children[r["trial_id"]]
            history = run.client.get_metric_history(child.info.run_id, EVAL_LOSS)
            final = max(history, key=lambda m: m.step).value
            replay.tell(child.data.tags[TRIAL_ID_TAG], child.data.tags[STATUS_TAG], final)
    assert not replay.remaining
    assert run.parent.data.params["optuna_round_size"] == "2"


@pytest.mark.slow
def test_logged_params_are_what_ran(optuna_run):
    assert tiny_sweeps.assert_params_are_what_ran(optuna_run) == len(optuna_run.children) == 4
