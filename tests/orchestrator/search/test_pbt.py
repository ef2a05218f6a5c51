"""Population-based training through a real sweep, and a scheduler added through the registry."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
from support import tiny_sweeps

from orchestrator.config.schema import PbtCfg, SweepDef
from orchestrator.config.strategies import SCHEDULERS, register
from orchestrator.search.params import normalize
from orchestrator.search.pbt import Pbt
from orchestrator.search.protocols import EXPLOIT, GO_ON, STOP, Decision, Report
from orchestrator.tracking.keys import LINEAGE_TAG
from qlora.optim import lr_at

LRS = [1e-4, 3e-4, 1e-3, 3e-3]


def _pbt_config(tmp_path, **pbt):
    sweep = SweepDef(name="pbt_t", params={"train.learning_rate": list(LRS)}, scheduler="pbt",
                     pbt=PbtCfg(**{"interval": 2, "quantile": 0.25, **pbt}))
    return tiny_sweeps.config(tmp_path, sweep, max_adapters=len(LRS))


def test_pbt_decides_from_the_pack_round_and_the_seed_alone(tmp_path):
    pbt = Pbt(normalize(_pbt_config(tmp_path)), 4)
    reports = [Report(f"t{i}", 4, loss, {"learning_rate": lr, "dropout": 0.0, "weight_decay": 0.0},
                      8) for i, (loss, lr) in enumerate(zip([2.0, 3.0, 1.0, 4.0], LRS, strict=True))]
    decisions = pbt.on_pack_results(reports)
    assert list(decisions) == ["t3"]  # the worst of 4, quantile 0.25: one
    [d] = decisions.values()
    assert d.action == EXPLOIT and d.source == "t2"  # the best
    assert d.values["learning_rate"] in (pytest.approx(1e-3 * 0.8), pytest.approx(1e-3 * 1.2))
    assert pbt.on_pack_results(list(reversed(reports))) == decisions  # order does not matter
    assert pbt.on_pack_results([replace(r, step=3) for r in reports]) == {}  # not an interval
    assert pbt.on_pack_results([replace(r, step=8) for r in reports]) == {}  # the end
    # Trials of other ranks never take each other's state: two shapes, two populations of 2.
    mixed = [replace(r, form="r4" if i % 2 else "r8") for i, r in enumerate(reports)]
    assert {t: d.source for t, d in pbt.on_pack_results(mixed).items()} == {"t0": "t2",
                                                                              "t3": "t1"}


@pytest.mark.slow
def test_pbt_sweep_exploits_inside_the_pack_and_records_it(ray_session, tmp_path):
    run = tiny_sweeps.run(tmp_path, _pbt_config(tmp_path))
    assert run.exit_code == 0
    assert run.parent.data.params["pbt_interval"] == "2"
    rows = run.rows()
    assert len({r["pack_id"] for r in rows.values()}) == 1  # one pack: the population
    exploited = {tid: r for tid, r in rows.items() if r["lineage"]}
    assert exploited, "no trial took another's state"
    client = run.client
    for tid, row in exploited.items():
        child = run.children[tid]
        assert child.data.tags[LINEAGE_TAG].startswith(f"step {row['lineage'][0]['step']}: from ")
        lrs = {int(m.step): m.value for m in client.get_metric_history(child.info.run_id, "lr")}
        pbt_lrs = {int(m.step): m.value
                   for m in client.get_metric_history(child.info.run_id, "pbt_learning_rate")}
        spec = tiny_sweeps_spec(row)
        for entry in row["lineage"]:
            step, new_lr = entry["step"], entry["values"]["learning_rate"]
            assert entry["source"] in rows and entry["source"] != tid
            assert pbt_lrs[step] == pytest.approx(new_lr)
            if step < row["steps"]:  # its next step runs with the new learning rate
                assert lrs[step + 1] == pytest.approx(lr_at(replace(spec, learning_rate=new_lr),
                                                            step))
        assert not math.isclose(row["trained"]["learning_rate"], row["learning_rate"])


def tiny_sweeps_spec(row):
    """The trial's engine spec as it started (the summary's `trained` holds where it ended)."""
    from qlora.config import TrialSpec

    trained = dict(row["trained"])
    trained.pop("data")
    return replace(TrialSpec(**trained), learning_rate=row["learning_rate"])


class StopAtFirstEvaluation:
    """A toy scheduler, known only through the registry: every trial stops at its first
    evaluation, which it sets at step 2."""

    live = True
    backfill = False
    keeps_packs = False

    def __init__(self, config, num_trials, objective=None):
        pass

    def eval_every(self, eval_every, max_steps):
        return 2

    def add_trial(self, trial_id, max_steps):
        pass

    def on_trial_result(self, trial_id, step, loss) -> Decision:
        return Decision(STOP, reason="toy") if step >= 2 else GO_ON

    def on_pack_results(self, reports):
        return {}

    def pending(self):
        return []

    def on_trial_complete(self, trial_id):
        pass

    def stops(self):
        return {}

    def params(self):
        return {"toy_scheduler": "stop at 2"}


@pytest.fixture
def toy_registered():
    import ray.cloudpickle

    # The coordinator actor unpickles the class; this test file is not a module Ray's workers
    # can import, so it travels by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register("scheduler", "toy", StopAtFirstEvaluation)
    yield
    SCHEDULERS.pop("toy")
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_a_scheduler_added_through_the_registry_alone_runs_a_sweep(ray_session, tmp_path,
                                                                    toy_registered):
    sweep = SweepDef(name="toy_t", params={"train.learning_rate": [1e-4, 1e-3]}, scheduler="toy")
    run = tiny_sweeps.run(tmp_path, tiny_sweeps.config(tmp_path, sweep))
    assert run.exit_code == 0
    assert run.parent.data.params["toy_scheduler"] == "stop at 2"
    assert {(r["status"], r["steps"]) for r in run.rows().values()} == {("stopped", 2)}


PBT = ("sweep.scheduler=pbt", "sweep.pbt.interval=4", "pack.max_adapters=4",
       "cluster.num_workers=1")


@pytest.mark.slow
def test_a_pbt_sweep_resumed_after_kill_9_of_its_driver_gives_the_same_numbers(ray_session,
                                                                                tmp_path):
    """The fault tests' sweep (r 4 and 8 x two learning rates, 16 steps, checkpoints every 4)
    under PBT every 4 steps: run once, and run as a user runs it, its driver killed after the
    step-8 checkpoints, then `resume=true`; every curve and every lineage the same."""
    import os
    import signal

    from support.fault_sweeps import OVERRIDES, SWEEP, Cli, ledger_of, matches_reference

    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate
    from orchestrator.sweep import run_sweep

    ref = tmp_path / "reference"
    config = validate(compose([*OVERRIDES, *PBT, f"tracking.uri=sqlite:///{ref}/mlflow.db",
                               f"tracking.artifact_location={ref}/mlartifacts",
                               f"output_dir={ref}/outputs"]))
    assert run_sweep(config) == 0
    reference = ledger_of(config.tracking.uri)
    lineage = {tid: runs[-1].data.tags.get(LINEAGE_TAG) for tid, runs in reference.runs.items()}
    # Rounds at steps 4, 8 and 12, two ranks of two trials: the worse of each takes the better's.
    assert sum(text.count("step ") for text in lineage.values() if text) == 6

    work = tmp_path / "cli"
    work.mkdir()
    cli = Cli(work, *PBT)
    try:
        cli.wait_for(lambda: any((work / "outputs" / SWEEP / "checkpoints").glob(
            "*/*/step-000008")))
        os.kill(cli.proc.pid, signal.SIGKILL)
        cli.proc.wait(30)
    finally:
        cli.cleanup()
    again = Cli(work, *PBT, "resume=true")
    assert again.finish() == 0, again.output()
    ledger = ledger_of(f"sqlite:///{work}/mlflow.db")
    matches_reference(ledger, reference)
    assert {tid: runs[-1].data.tags.get(LINEAGE_TAG) for tid, runs in ledger.runs.items()} == \
        lineage
