"""Faults: checkpoints, a lost worker, a lost driver, divergence, out of memory, Ctrl-C.

Three layers of tests, cheapest first:

- the driver's decisions on their own (no Ray): what goes again after a lost worker or an
  out-of-memory pack, and the ledger's resume in MLflow (SQLite);
- sweeps in this process on the session's Ray (`ray_session`): a diverging trial among three
  good ones, and an injected out-of-memory that splits the pack, each against the trials alone;
- the CLI as a user runs it, in a child process with its own local Ray: `kill -9` of the driver
  then `resume=true`, and Ctrl-C. Each is compared with the same sweep run once without faults
  in this process. (`kill -9` of a node's raylet and workers, on a real cluster of `ray start`
  processes while the tracking server is down, is test_cluster's.)
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from support.fault_sweeps import (
    OVERRIDES,
    REPO,
    SWEEP,
    Cli,
    Ledger,
    checkpointed,
    ledger_of,
    matches_reference,
    same_curve,
    summary_of,
)

from orchestrator.config.errors import ConfigError
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
from orchestrator.config.validate import validate
from orchestrator.search.expand import expand
from orchestrator.search.params import normalize
from orchestrator.search.trials import trial_id
from orchestrator.tracking.keys import (
    EVAL_LOSS,
    FAILURE_TAG,
    OOM_SPLITS_TAG,
    RESTARTS_TAG,
    TRAIN_LOSS,
    TRIAL_ID_TAG,
)
from orchestrator.tracking.tracker import Tracker

# -- helpers --------------------------------------------------------------------------------------

def _config(root: Path, name: str, params: dict, *, max_adapters: int, num_workers: int,
            **train) -> Config:
    """A small sweep on the tiny model (float32: bf16 matmuls are slow on CPUs)."""
    settings = dict(learning_rate=2e-3, max_steps=6, seq_len=64, micro_batch_size=2,
                    eval_every=3, checkpoint_every=2)
    return Config(
        quant=QuantCfg(compute_dtype="float32"),
        train=TrainCfg(**{**settings, **train}),
        data=DataCfg(max_eval_examples=16),
        pack=PackCfg(max_adapters=max_adapters),
        cluster=ClusterCfg(num_workers=num_workers),
        tracking=TrackingCfg(uri=f"sqlite:///{root}/mlflow.db",
                             artifact_location=str(root / "mlartifacts")),
        sweep=SweepDef(name=name, params=params),
        seed=3,
        output_dir=str(root / "outputs"),
    )


# -- what the driver decides (no Ray) --------------------------------------------------------------

def test_fault_settings_validate_and_leave_the_trial_id_alone(tmp_path):
    config = validate({"train": {"checkpoint_every": 5, "inject_oom_at_step": 3},
                       "cluster": {"checkpoint_dir": "/shared/ckpt", "max_retries": 1,
                                   "hang_timeout_s": None}})
    assert (config.train.checkpoint_every, config.train.inject_oom_at_step) == (5, 3)
    assert config.cluster.checkpoint_dir == "/shared/ckpt"
    assert validate({}).train.checkpoint_every == 20 and validate({}).cluster.checkpoint_dir is None
    assert config.cluster.hang_timeout_s is None and validate({}).cluster.hang_timeout_s == 1800
    assert trial_id(config) == trial_id(validate({}))
    [trial] = expand(config)
    assert trial.spec.inject_oom_at_step == 3  # reaches the engine
    for bad, key in [({"train": {"checkpoint_every": -1}}, "train.checkpoint_every"),
                     ({"train": {"inject_oom_at_step": 0}}, "train.inject_oom_at_step"),
                     ({"cluster": {"checkpoint_dir": " "}}, "cluster.checkpoint_dir"),
                     ({"cluster": {"hang_timeout_s": 0}}, "cluster.hang_timeout_s"),
                     ({"sweep": {"params": {"train.checkpoint_every": [1, 2]}}},
                      "sweep.params.train.checkpoint_every")]:
        with pytest.raises(ConfigError) as info:
            normalize(validate(bad))  # a sweep's params are checked by search's normalize
        assert info.value.key == key


def _trials(n: int, **train):
    config = _config(Path("/unused"), "unit", {"lora.r": [2 * (k + 1) for k in range(n)]},
                     max_adapters=n, num_workers=1, **train)
    return expand(config)


def test_out_of_memory_halves_the_pack_and_a_trial_alone_fails_with_advice():
    from orchestrator.cluster.events import PackOutcome
    from orchestrator.cluster.faults import after_oom
    from orchestrator.planner import Pack
    from qlora import TrialResult

    trials = _trials(4, inject_oom_at_step=3)
    ids = [t.trial_id for t in trials]
    done = TrialResult(ids[0], "diverged", 0, None, reason="diverged at step 1: loss is nan")
    placeholders = [TrialResult(t, "failed", 0, None, reason="pack failed") for t in ids[1:]]
    outcome = PackOutcome("p", [done, *placeholders], None, 0.0, 1.0, "OutOfMemoryError: x",
                          oom=True, interrupted=ids[1:])
    kept, again = after_oom(Pack("p", trials[0].base, trials), outcome)
    assert kept.results == [done] and kept.retried == ids[1:]  # an ended trial stays ended
    assert [[t.trial_id for t in p.trials] for p, _ in again] == [ids[1:3], ids[3:]]
    assert [p.pack_id for p, _ in again] == ["p-a", "p-b"]
    assert all(ev.cause == "oom" and ev.from_pack == "p" for _, ev in again)
    pair, [alone] = again[0][0].trials, again[1][0].trials
    # The injection fires in packs only: it simulates a pack too big for the device.
    assert all(t.spec.inject_oom_at_step == 3 for t in pair)
    assert alone.spec.inject_oom_at_step is None and alone.trial_id == ids[3]

    solo = replace(trials[1], base=replace(trials[1].base, gradient_checkpointing=False))
    outcome = PackOutcome("q", placeholders[:1], None, 0.0, 1.0, "OutOfMemoryError: y", oom=True,
                          interrupted=[ids[1]])
    kept, again = after_oom(Pack("q", solo.base, [solo]), outcome)
    assert again == [] and kept.retried == []
    [failed] = kept.results
    assert failed.status == "failed"
    for hint in ("alone", "train.micro_batch_size", "train.seq_len", "lora.r",
                 "train.gradient_checkpointing=true", "train.activation_offload=true",
                 "OutOfMemoryError: y"):
        assert hint in failed.reason, (hint, failed.reason)


def test_a_lost_worker_sends_its_unended_trials_again_until_retries_run_out():
    import ray

    from orchestrator.cluster.events import TrialEnded
    from orchestrator.cluster.faults import after_lost_worker
    from orchestrator.planner import Pack

    trials = _trials(3)
    ids = [t.trial_id for t in trials]
    streamed = {ids[0]: TrialEnded("p", ids[0], "diverged", 1, None, "diverged at step 1", 0.0),
                ids[1]: TrialEnded("p", ids[1], "finished", 6, 2.5, None, 0.0)}
    error = ray.exceptions.ActorDiedError()
    restarts: dict = {}
    pack = Pack("p", trials[0].base, trials)
    outcome, again = after_lost_worker(pack, error, streamed, restarts, max_retries=1)
    [diverged] = outcome.results  # streamed before the loss: kept, not run again
    assert (diverged.trial_id, diverged.status, diverged.reason) == (
        ids[0], "diverged", "diverged at step 1")
    # A finished trial whose adapter was lost goes again: its checkpoint returns it at once.
    [(retry, event)] = again
    assert [t.trial_id for t in retry.trials] == ids[1:] == outcome.retried == event.trial_ids
    assert (retry.pack_id, event.cause, restarts) == ("p-r1", "worker_lost", {i: 1 for i in ids[1:]})
    assert "ActorDiedError" in event.reason

    outcome, again = after_lost_worker(retry, error, {}, restarts, max_retries=1)
    assert again == [] and outcome.retried == []
    assert {r.trial_id for r in outcome.results} == set(ids[1:])
    for r in outcome.results:
        assert r.status == "failed" and "worker lost: ActorDiedError" in r.reason
        assert "after 1 restart;" in r.reason and "cluster.max_retries" in r.reason


def test_a_resumed_sweep_deletes_only_its_own_checkpoint_folder(ray_session, tmp_path,
                                                                capsys):
    """The parent run's `qlora.checkpoint_dir` tag is data anyone who can write to the store
    sets; a resumed sweep that finishes deletes its checkpoint root. The root comes from the
    config and the run id: a tag naming another folder is reported, and that folder is kept."""
    from orchestrator.sweep import run_sweep
    from orchestrator.tracking.keys import CHECKPOINT_DIR_TAG

    config = replace(_config(tmp_path, "victim", {"lora.r": [2]}, max_adapters=1, num_workers=1,
                             max_steps=2), output_dir=str(tmp_path / "outputs"))
    first = Tracker(config.tracking)  # a driver that died before training: runs stay RUNNING
    first.start_sweep(config, expand(config))
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "keep.txt").write_text("not the sweep's")
    first.set_sweep_tags({CHECKPOINT_DIR_TAG: str(victim)})
    first.flush(force=True)
    assert run_sweep(replace(config, resume=True)) == 0
    assert (victim / "keep.txt").read_text() == "not the sweep's"
    assert f"the sweep's tag {CHECKPOINT_DIR_TAG} names {victim}" in capsys.readouterr().err
    assert not (tmp_path / "outputs" / "victim" / "checkpoints" / first.parent_run_id).exists()


def test_resume_continues_the_latest_unfinished_sweep_in_its_own_runs(tmp_path):
    from qlora import TrialResult

    config = _config(tmp_path, "ledger", {"lora.r": [2, 4, 8]}, max_adapters=3, num_workers=1)
    trials = expand(config)
    ids = [t.trial_id for t in trials]
    first = Tracker(config.tracking)  # a driver that dies: its runs stay RUNNING
    first.start_sweep(config, trials)
    first.log_metrics(ids[0], 1, {TRAIN_LOSS: 2.0})
    first.end_trial(TrialResult(ids[0], "finished", 1, 1.5, train_losses=[2.0]))
    for step in (1, 2):
        first.log_metrics(ids[1], step, {TRAIN_LOSS: 3.0 - step})
    first.count(ids[1], RESTARTS_TAG)
    first.flush(force=True)
    done_before = first.client.get_run(first.run_ids[ids[0]])

    again = Tracker(config.tracking)
    assert again.find_unfinished_sweep("nope") is None
    parent = again.find_unfinished_sweep("ledger")
    assert parent.info.run_id == first.parent_run_id
    # The sweep changed meanwhile: trial 3 left it, a new trial joined.
    changed = expand(replace(config, sweep=SweepDef(name="ledger", params={"lora.r": [2, 4, 16]})))
    finished = again.resume_sweep(parent, config, changed)
    assert set(finished) == {ids[0]}
    assert again.run_ids[ids[0]] == first.run_ids[ids[0]]
    assert again.run_ids[ids[1]] == first.run_ids[ids[1]]  # continues in its own run
    new_id = changed[2].trial_id
    assert new_id not in first.run_ids
    for step in (1, 2, 3):  # steps 1-2 were logged by the lost driver: not twice
        again.log_metrics(ids[1], step, {TRAIN_LOSS: 3.0 - step})
    again.count(ids[1], RESTARTS_TAG)
    again.end_trial(TrialResult(ids[1], "finished", 3, 1.0, train_losses=[2.0, 1.0, 0.0]))
    again.end_trial(TrialResult(new_id, "finished", 3, 1.0, train_losses=[1.0, 1.0, 1.0]))
    again.end_sweep([])

    ledger = ledger_of(config.tracking.uri)
    assert len(ledger.parents) == 1 and ledger.parents[0].info.status == "FINISHED"
    assert ledger.parents[0].data.tags["qlora.resumes"] == "1"
    assert FAILURE_TAG not in ledger.parents[0].data.tags
    assert {tid: len(runs) for tid, runs in ledger.runs.items()} == {
        ids[0]: 1, ids[1]: 1, ids[2]: 1, new_id: 1}
    assert [s for s, _ in ledger.curves[ids[1]][TRAIN_LOSS]] == [1, 2, 3]
    resumed = ledger.runs[ids[1]][0]
    assert resumed.info.status == "FINISHED" and resumed.data.tags[RESTARTS_TAG] == "2"
    untouched = ledger.runs[ids[0]][0]
    assert untouched.info.end_time == done_before.info.end_time
    [orphan] = ledger.runs[ids[2]]  # no longer in the sweep, left RUNNING by the lost driver
    assert orphan.info.status == "KILLED" and "orphaned" in orphan.data.tags[FAILURE_TAG]
    assert again.find_unfinished_sweep("ledger") is None


def test_the_first_ctrl_c_stops_the_sweep_and_a_second_exits_at_once(monkeypatch):
    from orchestrator import sweep

    exits = []
    monkeypatch.setattr(sweep.os, "_exit", exits.append)  # instead of leaving pytest
    before = signal.getsignal(signal.SIGINT)
    with sweep._Interrupts():
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the sweep unwinds: runs KILLED, workers ended
        signal.raise_signal(signal.SIGINT)  # while it unwinds
        assert exits == [sweep.INTERRUPTED]
    assert signal.getsignal(signal.SIGINT) is before


# -- divergence and out of memory, in this process ---------------------------------------------------

#: Three good trials and one whose alpha makes its first gradient infinite (lr is bounded, alpha not).
PACK_OF_FOUR = {"lora.r": [8], "lora.alpha": [8.0, 16.0, 32.0, 1e30]}
BAD_ALPHA = 1e30


def _sweep(root: Path, **kwargs) -> tuple[int, Ledger]:
    from orchestrator.sweep import run_sweep

    config = _config(root, "four", PACK_OF_FOUR, **kwargs)
    code = run_sweep(config)
    return code, ledger_of(config.tracking.uri)


@pytest.fixture(scope="module")
def alone(ray_session, tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("alone"), max_adapters=1, num_workers=2)


def _split(ledger: Ledger):
    good, bad = {}, {}
    for tid, [run] in ledger.runs.items():  # exactly one run per trial
        (bad if float(run.data.params["lora_alpha"]) == BAD_ALPHA else good)[tid] = run
    return good, bad


def _matches_alone(ledger: Ledger, alone: Ledger, good: dict) -> None:
    for tid in good:
        for key in (TRAIN_LOSS, EVAL_LOSS):
            same_curve(ledger.curves[tid][key], alone.curves[tid][key], (tid, key))


@pytest.mark.slow
def test_a_diverging_trial_fails_and_its_three_pack_mates_match_their_runs_alone(
        alone, tmp_path):
    code, packed = _sweep(tmp_path, max_adapters=4, num_workers=1)
    assert code == 1 and alone[0] == 1
    good, bad = _split(packed)
    assert len(good) == 3 and len(bad) == 1
    assert len({r.data.tags["qlora.pack_id"] for r in packed.runs.values() for r in r}) == 1
    [run] = bad.values()
    assert run.info.status == "FAILED"
    assert run.data.tags[FAILURE_TAG].startswith("diverged at step 1: ")
    assert all(r.info.status == "FINISHED" for r in good.values())
    _matches_alone(packed, alone[1], good)


@pytest.mark.slow
def test_out_of_memory_splits_the_pack_and_every_trial_still_matches_alone(alone, tmp_path):
    code, split = _sweep(tmp_path, max_adapters=4, num_workers=1, inject_oom_at_step=3)
    assert code == 1  # the diverging trial, as alone
    good, bad = _split(split)
    [run] = bad.values()
    assert run.data.tags[FAILURE_TAG].startswith("diverged at step 1: ")  # ended before the OOM
    assert OOM_SPLITS_TAG not in run.data.tags
    # 3 trials out of memory at step 3 -> a pair and one alone; the pair again -> two alone.
    splits = sorted(int(r.data.tags[OOM_SPLITS_TAG]) for r in good.values())
    assert splits == [1, 2, 2]
    assert all(r.info.status == "FINISHED" for r in good.values())
    _matches_alone(split, alone[1], good)


def test_a_hung_worker_is_killed_and_its_pack_runs_again_with_the_same_numbers(
        reference, tmp_path, capsys):
    """A worker that Ray placed but that stops mid-pack (SIGSTOP: no step, no answer) is killed after
    `cluster.hang_timeout_s` and its pack runs again on a new worker, each trial's numbers
    those of the sweep without faults, every metric point once."""
    import threading

    import psutil

    from orchestrator.config.compose import compose
    from orchestrator.sweep import run_sweep

    config = validate(compose([*OVERRIDES, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                               f"tracking.artifact_location={tmp_path}/mlartifacts",
                               f"output_dir={tmp_path}/outputs", "pack.max_adapters=2",
                               "cluster.num_workers=2", "cluster.hang_timeout_s=6"]))
    stopped: list = []

    def stop_the_first_pack_to_start() -> None:
        deadline = time.monotonic() + 120
        checkpoints = Path(config.output_dir) / SWEEP / "checkpoints"
        while not any(checkpoints.glob("*/*/latest")) and time.monotonic() < deadline:
            time.sleep(0.005)  # both packs started; stop one of them mid-training
        while not stopped:
            for child in psutil.Process().children(recursive=True):
                try:
                    if child.cmdline()[0].startswith("ray::PackWorker.run_pack"):
                        child.suspend()  # SIGSTOP
                        stopped.append(child)
                        return
                except (psutil.Error, IndexError):
                    pass
            time.sleep(0.02)

    watcher = threading.Thread(target=stop_the_first_pack_to_start, daemon=True)
    watcher.start()
    assert run_sweep(config) == 0
    watcher.join(1)
    gone, _ = psutil.wait_procs(stopped, timeout=30)
    assert stopped and gone == stopped  # killed, not left stopped
    ledger = ledger_of(config.tracking.uri)
    matches_reference(ledger, reference)
    restarts = sorted(int(r[0].data.tags.get(RESTARTS_TAG, 0)) for r in ledger.runs.values())
    assert restarts == [0, 0, 1, 1]
    assert "WorkerHung" in capsys.readouterr().out


def test_a_full_disk_stops_the_sweep_resumable_and_resume_changes_no_number(reference, tmp_path,
                                                                          capsys):
    """`cluster.storage` on a disk that fills up once the first checkpoint is there: writes are
    tried again for `cluster.lost_timeout_s`, then the sweep stops with exit 3, no trial FAILED;
    with room again, `resume=true` ends with every number of the sweep without faults."""
    import threading

    from orchestrator.config.compose import compose
    from orchestrator.sweep import run_sweep

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        config = validate(compose([*OVERRIDES, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                   f"tracking.artifact_location={tmp_path}/mlartifacts",
                                   f"output_dir={tmp_path}/outputs", "pack.max_adapters=2",
                                   "cluster.num_workers=2", f"cluster.storage={disk}",
                                   "cluster.lost_timeout_s=5"]))
        filled: list = []

        def fill_once_checkpointed() -> None:
            deadline = time.monotonic() + 120
            while not any(disk.glob("checkpoints/*/*/latest")) and time.monotonic() < deadline:
                time.sleep(0.005)
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    filled.append(time.monotonic())

        filler = threading.Thread(target=fill_once_checkpointed, daemon=True)
        filler.start()
        assert run_sweep(config) == 3
        filler.join(5)
        assert filled
        out = "".join(capsys.readouterr())
        assert "cluster.storage" in out and "(the disk is full)" in out, out[-2000:]
        stopped = ledger_of(config.tracking.uri)
        assert "FAILED" not in {r.info.status for runs in stopped.runs.values() for r in runs}
        (disk / "filler").unlink()  # room again
        assert run_sweep(replace(config, resume=True)) == 0
        matches_reference(ledger_of(config.tracking.uri), reference)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# -- the CLI as a user runs it: kill -9 and Ctrl-C ----------------------------------------------------

@pytest.mark.slow
def test_kill_9_of_the_driver_then_resume_runs_only_what_was_left(reference, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    one_by_one = ("pack.max_adapters=1", "cluster.num_workers=1")
    cli = Cli(tmp_path, *one_by_one)
    try:
        cli.wait_for(checkpointed(tmp_path))  # by now the driver has set up the store
        client = MlflowClient(uri)

        def finished() -> list:
            try:
                return client.search_runs(
                    [client.get_experiment_by_name("qlora-sweeps").experiment_id],
                    "attributes.status = 'FINISHED'")
            except Exception:  # the experiment is not created yet
                return []

        cli.wait_for(finished)
        os.kill(cli.proc.pid, signal.SIGKILL)
        cli.proc.wait(30)
    finally:
        cli.cleanup()
    before = {r.data.tags[TRIAL_ID_TAG]: r for r in finished()}
    assert 1 <= len(before) < 4
    killed = ledger_of(uri)
    assert [p.info.status for p in killed.parents] == ["RUNNING"]  # as the lost driver left it

    again = Cli(tmp_path, "pack.max_adapters=4", "cluster.num_workers=1", "resume=true")
    assert again.finish() == 0, again.output()
    ledger = ledger_of(uri)
    assert [p.info.run_id for p in ledger.parents] == [killed.parents[0].info.run_id]
    assert ledger.parents[0].info.status == "FINISHED"
    matches_reference(ledger, reference)
    for tid, run in before.items():  # not trained again: same run, same end, one point per step
        [now] = ledger.runs[tid]
        assert (now.info.run_id, now.info.end_time) == (run.info.run_id, run.info.end_time)
    summary = summary_of(tmp_path)
    assert summary["resumed"] is True
    assert summary["trials_already_finished"] == len(before)
    assert summary["trials_dispatched"] == 4 - len(before)
    assert {r["trial_id"] for r in summary["trials"] if not r["dispatched"]} == set(before)


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@pytest.mark.slow
def test_a_cli_sweep_listens_on_loopback_only_and_ctrl_c_ends_it_resumable(tmp_path):
    # Long enough to be still training when the second driver below has started and asked.
    extra = ("pack.max_adapters=4", "cluster.num_workers=1", "train.max_steps=400")
    cli = Cli(tmp_path, *extra)
    try:
        cli.wait_for(checkpointed(tmp_path))
        # Its local Ray (GCS, raylet, agents, the training worker) is reachable from here alone.
        listening = cli.listening()
        names = {name for name, _ in listening}
        assert {"gcs_server", "raylet"} <= names and any("PackWorker" in n for n in names), names
        assert [(n, a) for n, a in listening if not _loopback(a)] == [], listening
        # A second driver may not take a sweep whose driver lives (the lease on its parent run).
        second = subprocess.run(
            [sys.executable, "-m", "orchestrator", *OVERRIDES, *extra, "resume=true"],
            cwd=tmp_path, capture_output=True,
            text=True, timeout=120, env={**{k: v for k, v in os.environ.items()
                                            if not k.startswith("RAY_")}, "PYTHONPATH": str(REPO)})
        cli.proc.send_signal(signal.SIGINT)
        assert cli.finish(timeout=60) == 130, cli.output()
    finally:
        cli.cleanup()
    out = cli.output()
    command = " ".join(["python -m orchestrator", *OVERRIDES[:2], f"'{OVERRIDES[2]}'",
                        *OVERRIDES[3:], *extra, "resume=true"])
    assert command in out, out
    assert "Traceback" not in out, out
    assert second.returncode == 2, second.stdout + second.stderr
    assert re.search(rf"^error: resume: sweep '{SWEEP}' \(parent run \w+\) is running \(driver "
                     rf"on {re.escape(socket.gethostname())}, last seen \d+ s ago\)",
                     second.stderr, re.M), second.stderr
    ledger = ledger_of(f"sqlite:///{tmp_path}/mlflow.db")
    assert [p.info.status for p in ledger.parents] == ["KILLED"]
    assert {runs[0].info.status for runs in ledger.runs.values()} == {"KILLED"}
    assert all(runs[0].data.tags[FAILURE_TAG] == "interrupted" for runs in ledger.runs.values())
    # The checkpoints a resume needs are on disk, under the parent run's own folder.
    parent_id = ledger.parents[0].info.run_id
    assert any((tmp_path / "outputs" / SWEEP / "checkpoints" / parent_id).glob("*/latest"))
