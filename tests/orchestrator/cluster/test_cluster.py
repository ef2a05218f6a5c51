"""Real clusters on this machine: `ray start` processes joined with `cluster.address=HOST:PORT`.

Each test starts its own head (and node) in process groups of their own (support.ray_cluster),
runs the fault tests' CLI sweep on it and compares every number with that sweep run once
without faults (`reference`): a node killed mid-sweep while the tracking server is down, and a
cluster that dies altogether.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from support.fault_sweeps import (
    STEPS,
    Cli,
    checkpointed,
    ledger_of,
    matches_reference,
    summary_of,
)
from support.netns import NetNs
from support.ray_cluster import Cluster
from support.servers import MlflowServer, MotoS3

from orchestrator.tracking.keys import FAILURE_TAG, NODE_TAG, RESTARTS_TAG, TRAIN_LOSS
from qlora.data import bundled_path

WAITING_ONE = "for 1 of 2 worker(s) to be placed, each asking 1 CPU (the cluster had 1 CPU"
STARTED = re.compile(r"^(pack\S+) started on node (\w+) ", re.M)


def _ray_env(cluster: Cluster) -> dict:
    return {k: v for k, v in cluster.env.items() if k.startswith("RAY_")}


def _live(client) -> bool:
    """A trial still RUNNING has part of its train_loss curve in the store."""
    try:
        [exp] = [e.experiment_id for e in client.search_experiments() if e.name == "qlora-sweeps"]
        runs = client.search_runs([exp], "attributes.status = 'RUNNING' and tags.`qlora.role` = 'trial'")
    except ValueError:  # not created yet
        return False
    return any(0 < len(client.get_metric_history(r.info.run_id, "train_loss")) < STEPS
               for r in runs)


def _steps(bucket) -> dict[str, int]:
    """The newest step each trial has a checkpoint of, in the bucket."""
    return {p: int(bucket.cat_file(p).decode().split("-")[1])
            for p in bucket.glob("sweeps/team/checkpoints/*/*/latest")}


def _went_on(bucket, before: dict[str, int]) -> bool:
    """A trial unfinished in `before` has a newer checkpoint now. Only those count: on a loaded
    machine the other node's pack may have finished before this one was placed."""
    now = _steps(bucket)
    return any(now.get(p, 0) > step for p, step in before.items() if step < STEPS)


@pytest.mark.slow
def test_a_node_killed_while_the_server_is_down_changes_no_number(reference, tmp_path):
    """The whole path a cluster user takes: `ray start` head and node, an `mlflow server` with
    proxied artifacts, checkpoints in an S3 bucket (moto's server). Mid-sweep the server stops
    answering, the node is killed (`kill -9` of its raylet and workers) while it is down, training
    goes on, and the server comes back: its pack went to the head, nothing logged was lost."""
    from mlflow import MlflowClient

    with MotoS3(tmp_path) as s3, MlflowServer(tmp_path) as server, \
            Cluster(tmp_path, nodes=1, env=s3.env) as cluster:  # each node has the bucket's keys
        bucket = s3.fs()
        bucket.mkdir("sweeps")
        [node] = cluster.nodes
        cli = Cli(tmp_path, "pack.max_adapters=2", "cluster.num_workers=2",
                  f"cluster.address={cluster.address}", f"tracking.uri={server.url}",
                  "cluster.storage=s3://sweeps/team", "tracking.register_as=cluster-best",
                  env={**_ray_env(cluster), **s3.env})
        try:
            cli.wait_for(lambda: node.pack_workers() and cluster.head.pack_workers())
            # Both packs are past step 4 of 16: every trial has a checkpoint, in the bucket...
            # ...and the UI's live curves: a RUNNING trial's first points are on the server.
            cli.wait_for(lambda: len(bucket.glob("sweeps/team/checkpoints/*/*/latest")) == 4
                         and _live(MlflowClient(server.url)))
            checkpoint_files = bucket.glob("sweeps/team/checkpoints/**/*.safetensors")
            server.stop()
            before = _steps(bucket)
            assert min(before.values()) < STEPS, before  # a trial is mid-way when the node dies
            node.kill()  # kill -9 of its raylet, agents and workers
            cli.wait_for(lambda: _went_on(bucket, before))  # training goes on
            cli.wait_for(lambda: "does not answer" in cli.output(tail=None))
            server.start()  # the same port and store
            assert cli.finish(timeout=300) == 0, cli.output()
            local = [p for where in (tmp_path, Path(cluster.temp_dir))
                     for p in where.rglob("optimizer.safetensors")]
        finally:
            cli.cleanup()
        ledger = ledger_of(server.url)
        client = MlflowClient(server.url)
        adapters = {tid: [f.path for f in client.list_artifacts(runs[0].info.run_id, "adapter")]
                    for tid, runs in ledger.runs.items()}
        champion = client.get_model_version_by_alias("cluster-best", "champion")
        [parent] = ledger.parents
        report = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
        stored = bucket.glob("sweeps/team/adapters/*/*/adapter/adapter_model.safetensors")
        left = bucket.glob("sweeps/team/checkpoints/**")
    out = cli.output(tail=None)
    started = dict(STARTED.findall(out))
    assert len(set(started.values())) == 2, out  # packs placed on both nodes
    assert "worker lost" in out and "answers again after" in out
    matches_reference(ledger, reference)  # every trial FINISHED once, the uninterrupted numbers,
    #                                       every point once: none lost, none twice
    restarts = {tid: int(runs[0].data.tags.get(RESTARTS_TAG, 0))
                for tid, runs in ledger.runs.items()}
    assert sorted(restarts.values()) == [0, 0, 1, 1]  # the lost node's pack of two
    rows = {r["trial_id"]: r for r in summary_of(tmp_path)["trials"]}
    retried = {tid for tid, r in rows.items() if r["pack_id"].endswith("-r1")}
    assert retried == {tid for tid, n in restarts.items() if n}
    # The retried pack ran on the node that was left: the head, where the other pack ran.
    [head_pack] = [p for p in started if p.endswith("-r1")] or [out]
    assert {runs[0].data.tags[NODE_TAG][:8] for runs in ledger.runs.values()} == {
        started[head_pack]}
    # Adapters on the server (uploaded through it, stored where it keeps artifacts) and in the
    # bucket; checkpoints only ever in the bucket, removed there once the sweep finished.
    assert all("adapter/adapter_model.safetensors" in files for files in adapters.values())
    assert len(list(server.artifacts.rglob("adapter_model.safetensors"))) >= 4
    # The registry and the report on the server: the best trial is the champion, plots on the parent.
    best = min(ledger.runs.values(), key=lambda runs: runs[0].data.metrics["eval_loss"])[0]
    assert champion.run_id == best.info.run_id
    assert {"report/loss_curves.png", "report/eval_vs_params.png"} <= report, report
    assert len(stored) == 4 and {r["adapter_storage"] for r in rows.values()} == {
        f"s3://{p.rsplit('/', 1)[0]}" for p in stored}
    assert len(checkpoint_files) >= 8 and local == [] and left == []
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in out
    for runs in [ledger.parents, *ledger.runs.values()]:
        for run in runs:
            assert secret not in str(run.data.params) + str(run.data.tags)


@pytest.mark.slow
def test_a_cluster_that_dies_stops_the_sweep_with_exit_3_and_resume_finishes_it(
        reference, tmp_path):
    lost_timeout = 6
    # A head with one CPU for two workers: one is placed, the other waits and the console says so.
    with Cluster(tmp_path, nodes=0) as cluster:
        cli = Cli(tmp_path, "pack.max_adapters=2", "cluster.num_workers=2",
                  f"cluster.address={cluster.address}",
                  f"cluster.lost_timeout_s={lost_timeout}", env=_ray_env(cluster))
        try:
            cli.wait_for(checkpointed(tmp_path))
            cli.wait_for(lambda: WAITING_ONE in cli.output(tail=None), timeout=120)
            cluster.close()  # the whole cluster: head, its raylet, GCS and workers
            gone = time.monotonic()
            code = cli.finish(timeout=lost_timeout + 120)
            took = time.monotonic() - gone
        finally:
            cli.cleanup()
    out = cli.output(tail=None)
    assert code == 3, out
    assert took < lost_timeout + 60, (took, out)
    assert re.search(r"^waiting since \d\d:\d\d:\d\d \(\d+ s\) " + re.escape(WAITING_ONE), out, re.M)
    assert "error: cluster.lost_timeout_s: no node could host a worker for 6 s" in out, out
    assert "Traceback" not in out, out
    resume = re.search(r"^  (python -m orchestrator .* resume=true)$", out, re.M)
    assert resume and f"cluster.address={cluster.address}" in resume.group(1), out
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lost = ledger_of(uri)
    assert [p.info.status for p in lost.parents] == ["KILLED"]
    statuses = {runs[0].info.status for runs in lost.runs.values()}
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    killed = [runs[0] for runs in lost.runs.values() if runs[0].info.status == "KILLED"]
    assert all(r.data.tags[FAILURE_TAG].startswith("sweep lost: no node could host")
               for r in killed)

    # The user's command, on a Ray of this machine instead of the dead cluster.
    again = Cli(tmp_path, "pack.max_adapters=2", "cluster.num_workers=2", "cluster.address=local",
                "resume=true")
    assert again.finish() == 0, again.output()
    ledger = ledger_of(uri)
    assert [p.info.status for p in ledger.parents] == ["FINISHED"]
    matches_reference(ledger, reference)


@pytest.mark.slow
def test_data_on_s3_is_tokenized_once_and_reaches_nodes_that_share_no_disk(tmp_path):
    """`data.path` on the bucket, nodes with caches of their own (no disk shared with the
    driver): the driver tokenizes the data once and uploads it beside the checkpoints; each node
    downloads it once and never reads or tokenizes the source itself."""
    nodes_cache = tmp_path / "nodes-cache"
    with MotoS3(tmp_path) as s3, \
            Cluster(tmp_path, nodes=1, env={**s3.env, "QLORA_CACHE": str(nodes_cache)}) \
            as cluster:
        bucket = s3.fs()
        bucket.mkdir("sweeps")
        bucket.put(str(bundled_path()), "sweeps/data/train.jsonl")
        cli = Cli(tmp_path, "pack.max_adapters=1", "cluster.num_workers=2",
                  "train.max_steps=4", "train.checkpoint_every=0", "eval.num_samples=0",
                  "++sweep.params={lora.r: [4, 8], train.learning_rate: [1e-3]}",
                  f"cluster.address={cluster.address}",
                  "cluster.storage=s3://sweeps/team", "data.path=s3://sweeps/data/train.jsonl",
                  env={**_ray_env(cluster), **s3.env})
        try:
            assert cli.finish(timeout=300) == 0, cli.output()
        finally:
            cli.cleanup()
        shared = bucket.glob("sweeps/team/data/*/meta.json")
    out = cli.output(tail=None)
    assert len({node for _, node in STARTED.findall(out)}) == 2, out  # a pack on each node
    fetched = list(nodes_cache.glob("data/*/fetched"))
    assert len(shared) == 1 and len(fetched) == 1 and fetched[0].parent.name in shared[0]
    assert not (nodes_cache / "data" / "records").exists()  # no node read the source
    summary = summary_of(tmp_path)
    assert {r["status"] for r in summary["trials"]} == {"finished"}


@pytest.mark.slow
def test_a_partitioned_node_s_pack_runs_elsewhere_and_the_cut_off_worker_writes_nothing(
        tmp_path):
    """A node in a network namespace of its own: its link is cut for longer than Ray's health
    check, then restored. Ray takes the node for dead, its pack runs again on another node from
    the checkpoints; the cut-off worker trains on meanwhile, and once the new attempt has claimed
    its trials it writes no checkpoint (fenced), and the driver records none of its stream."""
    if not NetNs.available():
        pytest.skip("a network namespace needs root (ip netns)")
    steps = PARTITION_STEPS
    with NetNs() as ns, Cluster(tmp_path, nodes=0, ip=ns.host_ip) as cluster:
        cut_off = cluster.add_node(1, 0, ip=ns.ns_ip, prefix=ns.prefix)
        cli = Cli(tmp_path, "pack.max_adapters=2", "cluster.num_workers=2",
                  f"cluster.address={cluster.address}", f"train.max_steps={steps}",
                  "train.eval_every=100", "eval.num_samples=0", env=_ray_env(cluster))
        try:
            cli.wait_for(lambda: cut_off.pack_workers() and cluster.head.pack_workers())
            spare = cluster.add_node(1, 1)  # where the cut-off node's pack can go
            cli.wait_for(checkpointed(tmp_path))
            ns.cut()
            cli.wait_for(lambda: "-r1 started on node" in cli.output(tail=None), timeout=240)
            # The new attempt claims the trials; the cut-off worker's next checkpoint is refused.
            cli.wait_for(lambda: _fenced(cluster), timeout=120)
            ns.restore()  # its raylet learns it was taken for dead, and ends with its workers
            assert cli.finish(timeout=400) == 0, cli.output()
        finally:
            cli.cleanup()
            spare.kill()
    out = cli.output(tail=None)
    assert "worker lost" in out, out
    ledger = ledger_of(f"sqlite:///{tmp_path}/mlflow.db")
    restarts = {tid: int(runs[0].data.tags.get(RESTARTS_TAG, 0))
                for tid, runs in ledger.runs.items()}
    assert sorted(restarts.values()) == [0, 0, 1, 1]
    for tid, runs in ledger.runs.items():
        assert [r.info.status for r in runs] == ["FINISHED"], tid
        # every step once: nothing of the cut-off worker's stream was recorded twice
        assert [s for s, _ in ledger.curves[tid][TRAIN_LOSS]] == list(range(1, steps + 1)), tid


PARTITION_STEPS = 300


def _fenced(cluster: Cluster) -> bool:
    """A worker of the cluster logged that it lost its claim on a trial."""
    return any("fenced: a later attempt" in p.read_text(errors="replace")
               for p in Path(cluster.temp_dir).glob("session_*/logs/worker-*.err"))
