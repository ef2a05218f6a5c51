"""`cluster.storage` by URI against a real S3-compatible server (moto's, on loopback): checkpoints
written and read back from the bucket and never from the local disk, and a bucket, endpoint or
credentials that do not work stopped before any training with one `error: cluster.storage:` line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support.fault_sweeps import REPO
from support.servers import MotoS3

from orchestrator.config.errors import ConfigError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with MotoS3(tmp_path_factory.mktemp("moto")) as server:
        server.fs().mkdir("sweeps")
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3.env


def test_a_checkpoint_goes_to_the_bucket_whole_and_comes_back_exactly(s3, s3_env, tmp_path,
                                                                      monkeypatch):
    from qlora import checkpoint

    monkeypatch.chdir(tmp_path)
    root = "s3://sweeps/ckpt/parent1"
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    adapter = {"w": layer.weight.detach().clone()}
    for step in (2, 4, 6):
        checkpoint.save(root, "t1", adapter, optimizer, {"step": step, "trial_id": "t1"})
    fs = s3.fs()
    assert fs.cat_file("sweeps/ckpt/parent1/t1/latest") == b"step-000006"
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("sweeps/ckpt/parent1/t1")
                   if "step-" in p)
    assert steps == ["step-000004", "step-000006"]  # KEEP = 2
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("sweeps/ckpt/parent1/t1/step-000006")) == [
        "adapter.safetensors", "optimizer.safetensors", "state.json"]
    back, opt_state, state = checkpoint.load(root, "t1")
    assert torch.equal(back["w"], adapter["w"]) and state["step"] == 6
    saved = optimizer.state_dict()["state"][0]
    assert torch.equal(opt_state["state"][0]["exp_avg"], saved["exp_avg"])
    assert checkpoint.load(root, "other") is None
    assert list(tmp_path.rglob("*")) == []  # nothing on the local disk
    checkpoint.remove(root)
    assert not fs.exists("sweeps/ckpt/parent1")


def test_storage_that_answers_passes_the_check_and_a_bad_one_names_the_key(s3, s3_env,
                                                                          monkeypatch, tmp_path):
    from orchestrator.cluster import storage
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate

    storage.check("s3://sweeps/prefix")
    assert not [p for p in s3.fs().find("sweeps/prefix") if ".qlora-probe" in p]  # cleaned up
    storage.check(str(tmp_path / "shared"))

    def error(uri: str) -> str:
        with pytest.raises(ConfigError) as info:
            storage.check(uri)
        assert info.value.key == "cluster.storage"
        return info.value.message

    assert "NoSuchBucket" in error("s3://no-such-bucket/x") or "not exist" in error(
        "s3://no-such-bucket/x")
    assert "Protocol not known" in error("nosuch://bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    message = error("s3://sweeps/prefix")
    assert "cannot write to s3://sweeps/prefix" in message and "AWS_ENDPOINT_URL" in message
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "credentials" in error("s3://sweeps/prefix").lower()

    for bad, words in [({"cluster.storage": "s3://key:secret@sweeps/x"}, "credentials"),
                       ({"cluster.storage": "s3://"}, "SCHEME://BUCKET"),
                       ({"cluster.storage": "s3://sweeps/x", "cluster.checkpoint_dir": "/x"},
                        "exclusive with cluster.checkpoint_dir")]:
        with pytest.raises(ConfigError) as info:
            validate(compose([f"{k}={v}" for k, v in bad.items()]))
        assert info.value.key == "cluster.storage" and words in info.value.message, info.value


def test_a_key_the_server_does_not_know_is_refused_before_training(tmp_path, monkeypatch):
    from orchestrator.cluster import storage

    with MotoS3(tmp_path, authenticate=True) as strict:
        for key, value in strict.env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ConfigError) as info:
            storage.check("s3://sweeps/prefix")
    message = info.value.message
    assert info.value.key == "cluster.storage" and "cannot write to s3://sweeps/prefix" in message
    assert "PermissionError: The AWS Access Key Id you provided does not exist" in message, message
    assert strict.env["AWS_SECRET_ACCESS_KEY"] not in message


def test_the_cli_stops_before_training_when_the_bucket_refuses(s3, tmp_path):
    env = {**os.environ, **s3.env, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "orchestrator", "cluster.storage=s3://absent/x",
                          "train.max_steps=2"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: cluster.storage: cannot write to s3://absent/x: "), line
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
    assert not (tmp_path / "mlflow.db").exists()  # before any run was recorded
