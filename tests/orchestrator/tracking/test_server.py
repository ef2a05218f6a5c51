"""The tracker against a real `mlflow server` that stops answering: every call waits for it
(nothing logged is lost when it answers again), and one that never comes back stops the sweep
(`SweepLost`, exit 3) after `tracking.lost_timeout_s`."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from support.servers import MlflowServer

from orchestrator.config.errors import SweepLost
from orchestrator.config.schema import Config, SweepDef, TrackingCfg
from orchestrator.search.expand import expand
from orchestrator.tracking.keys import TRAIN_LOSS
from orchestrator.tracking.tracker import Tracker

LOST_TIMEOUT = 6.0


def test_calls_wait_for_a_server_that_comes_back_and_give_up_on_one_that_does_not(tmp_path):
    with MlflowServer(tmp_path) as server:
        config = Config(tracking=TrackingCfg(uri=server.url, lost_timeout_s=120),
                        sweep=SweepDef(name="outage", params={"lora.r": [2, 4]}))
        trials = expand(config)
        tracker = Tracker(config.tracking)
        tracker.start_sweep(config, trials)
        tid = trials[0].trial_id
        tracker.log_metrics(tid, 1, {TRAIN_LOSS: 3.0})
        tracker.flush(force=True)

        server.stop()
        threading.Timer(3.0, server.start).start()  # back on the same port and store
        for step in (2, 3):
            tracker.log_metrics(tid, step, {TRAIN_LOSS: 3.0 - step / 10})
        began = time.monotonic()
        tracker.flush(force=True)  # waits for the server instead of failing
        waited = time.monotonic() - began
        assert 3.0 <= waited < 120, waited
        history = tracker.client.get_metric_history(tracker.run_ids[tid], TRAIN_LOSS)
        assert sorted((m.step, round(m.value, 6)) for m in history) == [
            (1, 3.0), (2, 2.8), (3, 2.7)]

        # A sweep that waits LOST_TIMEOUT s, and this time the server stays away.
        tracker = Tracker(replace(config.tracking, lost_timeout_s=LOST_TIMEOUT))
        tracker.start_sweep(config, trials)
        server.stop()
        tracker.log_metrics(tid, 4, {TRAIN_LOSS: 2.6})
        began = time.monotonic()
        with pytest.raises(SweepLost) as info:
            with tracker:  # as the sweep holds it: an abort must not wait for the server again
                tracker.flush(force=True)
        gave_up = time.monotonic() - began
    assert LOST_TIMEOUT <= gave_up < LOST_TIMEOUT + 40, gave_up
    assert info.value.key == "tracking.uri"
    assert f"the tracking server {server.url} did not answer for 6 s" in info.value.reason
