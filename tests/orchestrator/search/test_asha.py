"""Successive halving: the stopping rule, backfill on one worker, and a real sweep under ASHA."""

from __future__ import annotations

import dataclasses
import random

import pytest
from support import tiny_sweeps

from orchestrator.config.errors import ConfigError
from orchestrator.config.validate import validate
from orchestrator.search.asha import Asha, eval_every_for, rung_steps
from orchestrator.tracking.keys import (
    ADAPTER_DIR,
    EVAL_LOSS,
    PACK_TAG,
    STATUS_TAG,
    STOP_REASON_TAG,
    STOPPED_AT_RUNG_TAG,
    STOPPED_AT_STEP_TAG,
)

# -- the rule -------------------------------------------------------------------------------------


def test_rungs_are_fractions_of_each_trials_steps():
    assert rung_steps(60, [0.25, 0.5]) == [15, 30]
    assert rung_steps(8, [0.25, 0.5]) == [2, 4]
    assert rung_steps(2, [0.25, 0.5]) == [1]  # 0 and the end are no rungs
    assert eval_every_for(20, [15, 30]) == 15  # 20 misses the rungs: their gcd
    assert eval_every_for(5, [15, 30]) == 5  # already lands on every rung
    assert eval_every_for(0, [10, 20, 30]) == 10
    assert eval_every_for(7, []) == 7


def test_keep_is_the_best_one_over_eta_per_rung():
    asha = Asha([0.25, 0.5], eta=3, num_trials=12)
    assert [asha.keep(k) for k in (0, 1)] == [4, 1]
    assert Asha([0.5], eta=2, num_trials=6).keep(0) == 3
    assert Asha([0.5], eta=3, num_trials=2).keep(0) == 1  # always at least one goes on


def _losses(n: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {f"t{i}": rng.uniform(1, 5) for i in range(n)}


@pytest.mark.parametrize("seed", range(5))
def test_decisions_do_not_depend_on_arrival_order(seed):
    """Whatever the order, exactly the best `keep` pass a rung, and the best is never stopped."""
    losses = _losses(12, seed)
    order = list(losses)
    random.Random(seed + 100).shuffle(order)
    asha = Asha([0.25, 0.5], eta=3, num_trials=12)
    for tid in losses:
        asha.add_trial(tid, 60)
    for tid in order:
        asha.report(tid, 15, losses[tid])
    asha.pending_stops()  # trials that passed early are checked again against the later ones
    survivors = {t for t in losses if t not in asha.stops}
    assert survivors == set(sorted(losses, key=losses.get)[:4])
    for stop in asha.stops.values():
        assert (stop.rung, stop.step) == (1, 15) and "rung 1 (step 15)" in stop.reason


def test_a_trial_is_stopped_only_once_it_cannot_win():
    asha = Asha([0.5], eta=2, num_trials=4)  # keep 2 past the rung
    for tid in "abcd":
        asha.add_trial(tid, 10)
    assert asha.report("a", 5, 3.0) is None
    assert asha.report("b", 5, 2.0) is None
    assert asha.report("c", 5, 4.0) is not None  # two are better: it cannot be in the best two
    assert asha.report("a", 3, 1.0) is None  # not a rung: no decision
    assert asha.pending_stops() == ["c"]
    assert asha.report("d", 5, 1.0) is None
    assert set(asha.pending_stops()) == {"a", "c"}  # a passed first, then d and b beat it
    assert asha.keep(0) == 2 and len(asha.stops) == 2  # the best 2 of 4 (eta 2) go on


def test_a_nan_loss_ranks_last():
    asha = Asha([0.5], eta=2, num_trials=2)
    asha.add_trial("ok", 10)
    asha.add_trial("nan", 10)
    asha.report("ok", 5, 3.0)
    assert asha.report("nan", 5, float("nan")) is not None


@pytest.mark.parametrize("override, key", [
    ({"scheduler": "hyperband"}, "sweep.scheduler"),
    ({"asha": {"eta": 1}}, "sweep.asha.eta"),
    ({"asha": {"rungs": [0.5, 0.25]}}, "sweep.asha.rungs"),
    ({"asha": {"rungs": [1.5]}}, "sweep.asha.rungs"),
    ({"asha": {"rungs": []}}, "sweep.asha.rungs"),
])
def test_bad_asha_settings_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate({"sweep": {"params": {"lora.r": [4, 8]}, **override}})
    assert err.value.key == key


# -- backfill on one worker -----------------------------------------------------------------------


@pytest.mark.slow
def test_backfill_runs_more_trials_than_slots_on_one_base(ray_session, tmp_path):
    """Two slots, six trials: the four waiting ones fill freed slots of the same running pack,
    on the same worker, and the base is loaded once."""
    import ray

    from orchestrator.cluster.connect import connect, disconnect
    from orchestrator.cluster.dispatch import dispatch
    from orchestrator.cluster.events import PackOutcome
    from orchestrator.planner import Pack, pack_key
    from orchestrator.search.coordinator import CoordinatorHooks, SearchCoordinator
    from orchestrator.search.expand import expand

    cfg = tiny_sweeps.config(tmp_path, tiny_sweeps.asha_sweep())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=3))
    trials = expand(validate(dataclasses.asdict(cfg)))
    assert len(trials) == 6
    first, waiting = trials[:2], trials[2:]
    coordinator = ray.remote(SearchCoordinator).options(num_cpus=0).remote(None)
    ray.get(coordinator.add_waiting.remote(pack_key(first[0].base, first[0].spec.data.seq_len),
                                           [t.spec for t in waiting]))
    workers = connect(cfg.cluster)
    try:
        outcomes = [ev for events in dispatch([Pack("p-slots", first[0].base, first)], workers,
                                              hooks=CoordinatorHooks(coordinator))
                    for ev in events if isinstance(ev, PackOutcome)]
        assert ray.get(coordinator.waiting.remote()) == {}  # every waiting trial was taken
    finally:
        disconnect(workers)
        ray.kill(coordinator)
    [outcome] = outcomes  # one pack: one run_pack on one worker
    assert outcome.error is None
    assert [r.trial_id for r in outcome.results][:2] == [t.trial_id for t in first]
    assert {r.trial_id for r in outcome.results} == {t.trial_id for t in trials}
    assert all(r.status == "finished" and r.steps == 3 and r.adapter for r in outcome.results)
    assert outcome.base_loads == 1  # six trials, two slots, one base


# -- a sweep under ASHA ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def asha_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("asha")
    return tiny_sweeps.run(root, tiny_sweeps.config(root, tiny_sweeps.asha_sweep()))


@pytest.mark.slow
def test_asha_stops_the_worse_and_backfills_their_slots(asha_run):
    from orchestrator.search.expand import expand

    run = asha_run
    assert run.exit_code == 0  # stopped trials are no failures
    assert run.parent.info.status == "FINISHED"
    grid = dataclasses.replace(run.config, sweep=dataclasses.replace(run.config.sweep,
                                                                      scheduler="none"))
    assert set(run.children) == {t.trial_id for t in expand(grid)}  # the grid's very trials
    rows = run.rows()
    stopped = [r for r in rows.values() if r["status"] == "stopped"]
    finished = [r for r in rows.values() if r["status"] == "finished"]
    assert stopped and finished
    # One worker with two slots ran all six trials in one pack: the freed slots were backfilled.
    assert len({r.data.tags[PACK_TAG] for r in run.children.values()}) == 1
    assert len({r["placement"]["pid"] for r in rows.values()}) == 1
    search = run.summary["search"]
    assert search["training_steps"] == sum(r["steps"] for r in rows.values())
    assert search["training_steps"] < search["training_steps_if_all_ran"] == 6 * tiny_sweeps.MAX_STEPS
    assert search["best_trial_id"] in {r["trial_id"] for r in finished}
    assert search["best_eval_loss"] == min(r["eval_loss"] for r in finished)


@pytest.mark.slow
def test_stopped_trials_say_at_which_rung_and_why(asha_run):
    run = asha_run
    for tid, child in run.children.items():
        tags = child.data.tags
        assert child.info.status == "FINISHED"
        names = {a.path for a in run.client.list_artifacts(child.info.run_id, ADAPTER_DIR)}
        assert f"{ADAPTER_DIR}/adapter_model.safetensors" in names  # stopped ones export too
        if tags[STATUS_TAG] != "stopped":
            assert STOPPED_AT_RUNG_TAG not in tags
            continue
        rung, step = int(tags[STOPPED_AT_RUNG_TAG]), int(tags[STOPPED_AT_STEP_TAG])
        assert (rung, step) in {(1, 2), (2, 4)}  # 1/4 and 1/2 of 8 steps
        assert tags[STOP_REASON_TAG].startswith("asha: eval_loss ")
        assert f"at rung {rung} (step {step})" in tags[STOP_REASON_TAG]
        evals = dict((m.step, m.value) for m in
                     run.client.get_metric_history(child.info.run_id, EVAL_LOSS))
        assert step in evals  # the rung's evaluation is on the run
        assert run.rows()[tid]["stopped_at_rung"] == rung


@pytest.mark.slow
def test_logged_params_are_what_ran(asha_run):
    # ASHA evaluates at its rungs (steps 2 and 4 of 8) though the config says every 4 steps.
    assert {row["trained"]["eval_every"] for row in asha_run.summary["trials"]} == {2}
    assert tiny_sweeps.assert_params_are_what_ran(asha_run) == len(asha_run.children)


@pytest.mark.slow
def test_a_coordinator_lost_mid_sweep_is_restored_and_decides_the_same(asha_run, tmp_path,
                                                                        capsys):
    """The coordinator's process is killed (`kill -9`) once trials have reported at a rung:
    Ray restarts it, the driver gives it back what it saw, and the sweep ends as the one that
    lost nothing: the same trials stopped at the same rungs, the others finished, one pack."""
    import sqlite3
    import threading
    import time

    import psutil

    killed: list = []

    def kill_after_two_evaluations() -> None:
        db, deadline = tmp_path / "mlflow.db", time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db) as con:
                    [(n,)] = con.execute("select count(*) from metrics where key = 'eval_loss'")
            except sqlite3.Error:
                n = 0
            if n >= 2:
                break
            time.sleep(0.05)
        for child in psutil.Process().children(recursive=True):
            try:
                if child.cmdline()[0].startswith("ray::SearchCoordinator"):
                    child.kill()
                    killed.append(child.pid)
            except (psutil.Error, IndexError):
                pass

    thread = threading.Thread(target=kill_after_two_evaluations, daemon=True)
    thread.start()
    run = tiny_sweeps.run(tmp_path, tiny_sweeps.config(tmp_path, tiny_sweeps.asha_sweep()))
    thread.join(5)
    assert killed and run.exit_code == 0
    assert "the search's coordinator was lost and restarted; restored" in capsys.readouterr().out
    want, got = asha_run.rows(), run.rows()
    assert set(got) == set(want)
    for tid, row in got.items():
        assert (row["status"], row.get("stopped_at_rung")) == (
            want[tid]["status"], want[tid].get("stopped_at_rung")), tid
    assert len({r.data.tags[PACK_TAG] for r in run.children.values()}) == 1
