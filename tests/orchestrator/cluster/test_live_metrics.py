"""Metrics reach the MLflow store while trials train, so the UI shows live curves."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient


@pytest.mark.slow
def test_train_loss_is_in_the_store_while_the_trial_still_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "train.max_steps=80", "train.eval_every=0",
         "train.seq_len=64", "train.micro_batch_size=2", "data.max_eval_examples=8",
         "cluster.num_workers=1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    seen_live = None
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and seen_live is None:
            time.sleep(0.5)
            if not (tmp_path / "mlflow.db").exists():
                continue
            try:
                runs = client.search_runs(
                    [e.experiment_id for e in client.search_experiments()],
                    "tags.`qlora.role` = 'trial'")
            except Exception:  # the store is still being created
                continue
            for run in runs:
                if run.info.status != "RUNNING":
                    continue
                points = client.get_metric_history(run.info.run_id, "train_loss")
                if 0 < len(points) < 80:
                    seen_live = (len(points), run.info.run_id)
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seen_live is not None, "no train_loss point was in the store while the trial ran"
    # ...and at the end the whole curve is there, each step once.
    steps = [m.step for m in client.get_metric_history(seen_live[1], "train_loss")]
    assert steps == list(range(1, 81))
