"""`run_sweep` end to end: the real engine on the tiny model, real Ray, real MLflow (SQLite).

One small grid (rank 4, 8 x alpha 16, 1e30) runs twice: alone (`pack.max_adapters=1`, two
workers, so each worker also reuses its base for a second pack) and packed (all four trials on
one base). An alpha of 1e30 makes the gradient infinite at the first step (validation bounds the
learning rate, not alpha), so the same two runs show the failure path too, and that a diverging
neighbour does not disturb the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from support.tiny_sweeps import SweepRun, assert_params_are_what_ran
from support.tiny_sweeps import run as run_tiny

from orchestrator.config.schema import (
    ClusterCfg,
    Config,
    DataCfg,
    PackCfg,
    QuantCfg,
    SweepDef,
    TrackingCfg,
    TrainCfg,
)
from orchestrator.tracking.keys import (
    ADAPTER_DIR,
    EVAL_LOSS,
    FAILURE_TAG,
    PACK_TAG,
    PARENT_TAG,
    ROLE_TAG,
    TRAIN_LOSS,
)
from orchestrator.tracking.tracker import Tracker

MAX_STEPS = 6
GOOD_ALPHA, BAD_ALPHA = 16.0, 1e30


def _config(root: Path, max_adapters: int, num_workers: int | None) -> Config:
    return Config(
        train=TrainCfg(max_steps=MAX_STEPS, seq_len=64, micro_batch_size=2, eval_every=3),
        data=DataCfg(max_eval_examples=16),
        quant=QuantCfg(compute_dtype="float32"),  # as model=tiny sets
        pack=PackCfg(max_adapters=max_adapters),
        cluster=ClusterCfg(num_workers=num_workers),
        tracking=TrackingCfg(uri=f"sqlite:///{root}/mlflow.db",
                             artifact_location=str(root / "mlartifacts")),
        sweep=SweepDef(name="e2e", params={"lora.r": [4, 8], "lora.alpha": [GOOD_ALPHA, BAD_ALPHA]}),
        seed=7,
        output_dir=str(root / "outputs"),
    )


def _run(root: Path, max_adapters: int, num_workers: int | None) -> SweepRun:
    result = run_tiny(root, _config(root, max_adapters, num_workers))
    runs = result.client.search_runs([result.parent.info.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(parents) == 1
    assert len(result.children) == len(runs) - 1
    return result


@pytest.fixture(scope="module")
def alone(ray_session, tmp_path_factory) -> SweepRun:
    return _run(tmp_path_factory.mktemp("alone"), max_adapters=1, num_workers=None)


@pytest.fixture(scope="module")
def packed(ray_session, tmp_path_factory) -> SweepRun:
    return _run(tmp_path_factory.mktemp("packed"), max_adapters=4, num_workers=1)


def _good(run: SweepRun) -> dict:
    return {tid: r for tid, r in run.children.items()
            if float(r.data.params["lora_alpha"]) == GOOD_ALPHA}


def _bad(run: SweepRun) -> dict:
    return {tid: r for tid, r in run.children.items()
            if float(r.data.params["lora_alpha"]) == BAD_ALPHA}


def _history(run: SweepRun, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in run.client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_holds_the_sweep_as_promised(alone):
    from orchestrator.search.expand import expand

    assert alone.parent.info.run_name == "e2e"
    assert alone.parent.data.params["sweep_name"] == "e2e"
    trials = {t.trial_id: t for t in expand(alone.config)}
    assert set(alone.children) == set(trials)
    for tid, run in alone.children.items():
        trial = trials[tid]
        assert run.data.tags[PARENT_TAG] == alone.parent.info.run_id
        assert run.info.run_name == trial.name
        assert run.info.experiment_id == alone.parent.info.experiment_id
        params = run.data.params
        assert int(params["lora_r"]) == trial.spec.r
        assert float(params["lora_alpha"]) == trial.spec.alpha
        assert float(params["learning_rate"]) == trial.spec.learning_rate
        assert params["train_max_steps"] == str(MAX_STEPS)
        assert params["quant_type"] == "nf4" and params["model_name_or_path"] == "tiny"

    for run in _good(alone).values():
        assert run.info.status == "FINISHED"
        train = _history(alone, run.info.run_id, TRAIN_LOSS)
        assert [s for s, _ in train] == list(range(1, MAX_STEPS + 1))  # one point per step
        evals = _history(alone, run.info.run_id, EVAL_LOSS)
        assert [s for s, _ in evals] == [3, MAX_STEPS]  # every eval_every steps and at the end
        assert all(math.isfinite(v) for _, v in train + evals)
        assert FAILURE_TAG not in run.data.tags


@pytest.mark.slow
def test_adapters_load_with_peft(alone):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for tid, run in _good(alone).items():
        names = {a.path for a in alone.client.list_artifacts(run.info.run_id, ADAPTER_DIR)}
        assert names == {f"{ADAPTER_DIR}/adapter_config.json",
                         f"{ADAPTER_DIR}/adapter_model.safetensors"}
        from_mlflow = Path(alone.client.download_artifacts(
            run.info.run_id, ADAPTER_DIR, str(alone.root / "download" / tid)))
        local = alone.root / "outputs" / "e2e" / "latest" / run.info.run_name / "adapter"
        for folder in (from_mlflow, local):
            config = json.loads((folder / "adapter_config.json").read_text())
            assert config["r"] == int(run.data.params["lora_r"])
            base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"],
                                                        dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(folder))
            saved = load_file(str(folder / "adapter_model.safetensors"))
            loaded = get_peft_model_state_dict(model)
            assert saved.keys() == loaded.keys() and saved
            for key, tensor in saved.items():
                torch.testing.assert_close(loaded[key].float(), tensor.float())
            assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0  # it trained
                       for k, v in saved.items())


@pytest.mark.slow
def test_a_diverged_trial_fails_alone(alone):
    assert alone.exit_code == 1
    for run in _bad(alone).values():
        assert run.info.status == "FAILED"
        assert "diverged" in run.data.tags[FAILURE_TAG]
        assert not alone.client.list_artifacts(run.info.run_id, ADAPTER_DIR)
    assert all(r.info.status == "FINISHED" for r in _good(alone).values())
    assert alone.parent.info.status == "FAILED"
    assert alone.parent.data.tags[FAILURE_TAG] == "2 of 4 trials failed"

    summary = json.loads((alone.root / "outputs" / "e2e" / "latest" / "summary.json").read_text())
    assert summary["exit_code"] == 1 and summary["parent_run_id"] == alone.parent.info.run_id
    rows = {r["trial_id"]: r for r in summary["trials"]}
    assert rows.keys() == alone.children.keys()
    for tid, row in rows.items():
        assert row["run_id"] == alone.children[tid].info.run_id
        assert (row["status"] == "finished") == (tid in _good(alone))


@pytest.mark.slow
def test_packing_does_not_change_a_trials_numbers(alone, packed):
    assert packed.exit_code == alone.exit_code == 1
    assert set(packed.children) == set(alone.children)  # same trial ids
    assert len({r.data.tags[PACK_TAG] for r in alone.children.values()}) == 4
    assert len({r.data.tags[PACK_TAG] for r in packed.children.values()}) == 1
    for tid, run in alone.children.items():
        other = packed.children[tid]
        assert other.info.status == run.info.status
        for key in (TRAIN_LOSS, EVAL_LOSS):
            mine = _history(alone, run.info.run_id, key)
            theirs = _history(packed, other.info.run_id, key)
            assert [s for s, _ in mine] == [s for s, _ in theirs], key
            for (_, a), (_, b) in zip(mine, theirs, strict=True):
                assert math.isclose(a, b, rel_tol=1e-4), (key, mine, theirs)


def _doomed_then_ok(config: Config, doomed, ok) -> dict:
    """Dispatch a pack of `doomed` then one of `ok` on the session's Ray; outcomes by pack id."""
    from orchestrator.cluster.connect import connect, disconnect
    from orchestrator.cluster.dispatch import dispatch
    from orchestrator.cluster.events import PackOutcome
    from orchestrator.planner import Pack

    workers = connect(config.cluster)
    assert not workers.owns_ray  # the session's Ray, left running by disconnect()
    packs = [Pack("p-doomed", doomed.base, [doomed]), Pack("p-ok", ok.base, [ok])]
    try:
        outcomes = {ev.pack_id: ev for events in dispatch(packs, workers) for ev in events
                    if isinstance(ev, PackOutcome)}
    finally:
        disconnect(workers)
    assert outcomes.keys() == {"p-doomed", "p-ok"}
    return outcomes


@pytest.mark.slow
def test_an_engine_exception_fails_only_its_pack(ray_session, tmp_path):
    from orchestrator.search.expand import expand

    config = dataclasses.replace(_config(tmp_path, 1, None), sweep=SweepDef(
        name="oom", params={"lora.r": [4, 8]}))
    ok, doomed = expand(config)
    doomed = dataclasses.replace(doomed, spec=dataclasses.replace(doomed.spec,
                                                                  inject_oom_at_step=2))
    outcomes = _doomed_then_ok(config, doomed, ok)
    [failed] = outcomes["p-doomed"].results
    assert failed.status == "failed" and "OutOfMemoryError" in failed.reason
    assert "OutOfMemoryError" in outcomes["p-doomed"].error
    [finished] = outcomes["p-ok"].results
    assert finished.status == "finished" and finished.steps == MAX_STEPS
    assert set(finished.adapter) == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.slow
def test_any_other_engine_error_fails_only_its_pack(ray_session, tmp_path):
    """Not out of memory: the worker fails the pack's trials with the error, drops its base,
    and the next pack trains on a freshly loaded one."""
    from orchestrator.search.expand import expand
    from orchestrator.search.trials import apply, make_trial

    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": str(i)} for i in range(20)]
    data = tmp_path / "gone.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = dataclasses.replace(_config(tmp_path, 1, 1), sweep=SweepDef(name="err"))
    [ok] = expand(config)
    doomed = make_trial(apply(config, {"data.path": str(data)}), {"data.path": str(data)})
    data.unlink()  # the file went away after the sweep was checked
    outcomes = _doomed_then_ok(config, doomed, ok)
    [failed] = outcomes["p-doomed"].results
    assert failed.status == "failed" and "gone.jsonl" in failed.reason
    assert not outcomes["p-doomed"].oom and outcomes["p-doomed"].interrupted == [doomed.trial_id]
    [finished] = outcomes["p-ok"].results
    assert finished.status == "finished" and finished.steps == MAX_STEPS
    assert outcomes["p-ok"].base_loads == 1  # one worker: the failed pack's base was dropped


def test_no_run_is_left_running_when_the_driver_is_interrupted(tmp_path):
    from orchestrator.search.expand import expand

    config = _config(tmp_path, 1, None)
    trials = expand(config)
    tracker = Tracker(config.tracking)
    with pytest.raises(KeyboardInterrupt), tracker:
        tracker.start_sweep(config, trials)
        tracker.log_metrics(trials[0].trial_id, 1, {TRAIN_LOSS: 1.5})
        raise KeyboardInterrupt
    runs = tracker.client.search_runs([tracker.experiment_id])
    assert len(runs) == len(trials) + 1
    assert {r.info.status for r in runs} == {"KILLED"}
    assert all(r.data.tags[FAILURE_TAG] == "interrupted" for r in runs)
    # What was buffered before the interrupt still reached the store.
    run_id = tracker.run_ids[trials[0].trial_id]
    assert [m.value for m in tracker.client.get_metric_history(run_id, TRAIN_LOSS)] == [1.5]


@pytest.mark.slow
def test_logged_params_are_what_ran(alone, packed):
    for run in (alone, packed):
        assert assert_params_are_what_ran(run) == len(run.children) == 4
