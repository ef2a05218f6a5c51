"""The tracker against a real `mlflow server` that stops answering and never comes back: the
sweep stops (`SweepLost`, exit 3) after `tracking.lost_timeout_s`, without waiting again while it
ends. (A server that comes back mid-sweep, nothing lost: test_cluster's node-loss test.)"""

from __future__ import annotations

import time

import pytest
from support.servers import MlflowServer

from orchestrator.cluster.lost import SweepLost
from orchestrator.config.schema import Config, SweepDef, TrackingCfg
from orchestrator.search.expand import expand
from orchestrator.tracking.keys import TRAIN_LOSS
from orchestrator.tracking.tracker import Tracker

LOST_TIMEOUT = 6.0


def test_a_server_that_does_not_come_back_stops_the_sweep_after_the_timeout(tmp_path):
    with MlflowServer(tmp_path) as server:
        config = Config(tracking=TrackingCfg(uri=server.url, lost_timeout_s=LOST_TIMEOUT),
                        sweep=SweepDef(name="outage", params={"lora.r": [2, 4]}))
        trials = expand(config)
        tracker = Tracker(config.tracking)
        tracker.start_sweep(config, trials)
        tid = trials[0].trial_id
        tracker.log_metrics(tid, 1, {TRAIN_LOSS: 3.0})
        tracker.flush(force=True)
        server.stop()
        tracker.log_metrics(tid, 2, {TRAIN_LOSS: 2.9})
        began = time.monotonic()
        with pytest.raises(SweepLost) as info:
            with tracker:  # as the sweep holds it: its abort must not wait for the server again
                tracker.flush(force=True)  # kept: training would go on meanwhile
                assert tracker.client.waiting == 1
                tracker.end_sweep([])  # the sweep's end waits for the server, then gives up
        gave_up = time.monotonic() - began
    assert LOST_TIMEOUT <= gave_up < LOST_TIMEOUT + 20, gave_up
    assert info.value.key == "tracking.uri"
    assert f"the tracking server {server.url} did not answer for 6 s" in info.value.reason


def test_a_server_whose_store_fails_is_an_outage_and_nothing_logged_is_lost(tmp_path, capsys):
    """The server answers, but 5xx: its store is down (here its SQLite file made immutable, so
    every write fails and `mlflow server` answers 503). Kept and sent again, as when it does
    not answer at all; once the store is back, every point is there once."""
    import subprocess

    from mlflow import MlflowClient

    with MlflowServer(tmp_path) as server:
        store = tmp_path / "server.db"
        if subprocess.run(["chattr", "+i", str(store)], capture_output=True).returncode:
            pytest.skip("chattr +i needs root on a file system that has it (ext4, xfs)")
        subprocess.run(["chattr", "-i", str(store)], check=True)
        config = Config(tracking=TrackingCfg(uri=server.url, lost_timeout_s=120),
                        sweep=SweepDef(name="store-down", params={"lora.r": [2]}))
        [trial] = expand(config)
        tracker = Tracker(config.tracking)
        tracker.start_sweep(config, [trial])
        tracker.log_metrics(trial.trial_id, 1, {TRAIN_LOSS: 3.0})
        tracker.flush(force=True)
        subprocess.run(["chattr", "+i", str(store)], check=True)  # the store goes down
        try:
            tracker.log_metrics(trial.trial_id, 2, {TRAIN_LOSS: 2.9})
            tracker.flush(force=True)  # refused with 503: kept, training goes on
            assert tracker.client.waiting == 1
        finally:
            subprocess.run(["chattr", "-i", str(store)], check=True)  # and comes back
        tracker.end_sweep([])
        run_id = tracker.run_ids[trial.trial_id]
        history = MlflowClient(server.url).get_metric_history(run_id, TRAIN_LOSS)
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.9)]
    err = capsys.readouterr().err
    assert f"the tracking server {server.url} does not answer" in err
    assert "answers again after" in err
