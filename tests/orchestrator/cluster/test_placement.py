"""Placement: one worker per GPU across nodes, each seeing only its own device, all at once.

Ray's `cluster_utils.Cluster` fakes two nodes with two logical GPUs each (num_cpus=2 each) on this
machine; Ray hands out GPU ids and sets CUDA_VISIBLE_DEVICES exactly as on real GPUs, while the
tiny model trains on the CPU. A process holds one Ray, and the session's own Ray is running for
the other tests, so the sweep runs in a child process (this file run as a script) that joins the
fake cluster with `cluster.address=auto` (RAY_ADDRESS names it), as a user joins a real one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SWEEP = "placement"
NODES, GPUS_PER_NODE = 2, 2


@pytest.mark.slow
def test_one_worker_per_gpu_all_at_once(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ)  # conftest's one-thread and model-cache settings included
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=repo, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "outputs" / SWEEP / "latest" / "summary.json").read_text())
    rows = summary["trials"]
    assert summary["exit_code"] == 0 and len(rows) == 8
    assert {r["status"] for r in rows} == {"finished"}

    packs = {}
    for r in rows:
        packs.setdefault(r["pack_id"], r)
    assert len(packs) == 4 and all(
        sum(r["pack_id"] == p for r in rows) == 2 for p in packs)  # pack.max_adapters=2

    places = [p["placement"] for p in packs.values()]
    devices = [(p["node_id"], p["cuda_visible_devices"]) for p in places]
    assert len(set(devices)) == 4, devices  # one worker per GPU
    assert len({p["node_id"] for p in places}) == NODES
    for p in places:
        assert p["cuda_visible_devices"] in {str(i) for i in range(GPUS_PER_NODE)}, p  # one id
        assert p["gpu_ids"] == [p["cuda_visible_devices"]], p
    assert len({p["pid"] for p in places}) == 4

    started = [p["pack_started"] for p in packs.values()]
    ended = [p["pack_ended"] for p in packs.values()]
    assert max(started) < min(ended), (started, ended)  # all four packs overlapped in time


def _main(root: Path) -> int:
    """Start the fake cluster, run an 8-trial sweep on it through `run_sweep`, return its code."""
    import torch
    from ray.cluster_utils import Cluster

    from orchestrator.config.schema import (
        ClusterCfg,
        Config,
        DataCfg,
        PackCfg,
        SweepDef,
        TrackingCfg,
        TrainCfg,
    )
    from orchestrator.sweep import run_sweep

    torch.set_num_threads(1)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": GPUS_PER_NODE, "include_dashboard": False})
    for _ in range(NODES - 1):
        cluster.add_node(num_cpus=2, num_gpus=GPUS_PER_NODE)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    try:
        return run_sweep(Config(
            train=TrainCfg(max_steps=16, seq_len=64, micro_batch_size=2),
            data=DataCfg(max_eval_examples=8),
            pack=PackCfg(max_adapters=2),
            cluster=ClusterCfg(address="auto", gpus_per_worker=1),
            tracking=TrackingCfg(uri=f"sqlite:///{root}/mlflow.db",
                                 artifact_location=str(root / "mlartifacts")),
            sweep=SweepDef(name=SWEEP, params={"lora.r": [4, 8], "lora.alpha": [8.0, 16.0],
                                               "train.learning_rate": [1e-3, 2e-3]}),
            output_dir=str(root / "outputs"),
        ))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(_main(Path(sys.argv[1])))
