"""A loaded adapter gets the very base it trained on: the run records the base's commit (a hub
commit, or a digest of its folder's files), loading pins a hub base to that commit and checks a
folder's files, and a model version's tags that disagree with the run's record are reported, not
followed (tags can be set by anyone who may tag the version; a run's params are written once)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import tiny_sweeps

from orchestrator.load import LoadError, base_spec, load_adapter, main
from orchestrator.tracking.keys import CHAMPION_ALIAS
from qlora.base import base_commit
from qlora.config import BaseSpec

REPO = Path(__file__).resolve().parents[3]
OLD, NEW = "a" * 40, "b" * 40


def test_a_hub_base_loads_at_the_commit_it_trained_on_not_where_its_branch_is_now(
        tiny_path, tmp_path):
    """A hub cache (the layout `huggingface_hub` writes) holding two commits of `someone/tiny`,
    `main` now at the newer one; offline, as a cluster node may be."""
    repo = tmp_path / "hub" / "models--someone--tiny"
    for commit, layers in ((OLD, None), (NEW, 1)):
        snapshot = repo / "snapshots" / commit
        shutil.copytree(tiny_path, snapshot)
        if layers:  # the newer commit changed the model
            config = json.loads((snapshot / "config.json").read_text())
            config["num_hidden_layers"] = layers
            (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    script = f"""
import json
from orchestrator.load import LoadError, base_spec
from qlora import load_base
from qlora.base import base_commit
from qlora.config import BaseSpec
out = {{"now": base_commit(BaseSpec(name_or_path="someone/tiny"))}}
spec = base_spec({{"base_model": "someone/tiny", "base_revision": "main",
                  "base_commit": "{OLD}", "quant_compute_dtype": "float32"}})
base = load_base(spec, "cpu")
out.update(revision=spec.revision, pinned=base_commit(spec),
           layers=base.model.config.num_hidden_layers)
try:
    base_spec({{"base_model": "someone/tiny", "base_commit": "{'c' * 40}"}})
except LoadError as e:
    out["gone"] = str(e)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["now"] == NEW  # what a sweep would record today
    assert out["revision"] == out["pinned"] == OLD  # what the adapter trained on, not main
    # and the weights loaded are that commit's: the newer one has a single layer
    assert out["layers"] == json.loads((tiny_path / "config.json").read_text())[
        "num_hidden_layers"] > 1
    assert out["gone"].startswith(f"its base someone/tiny at {'c' * 40} cannot be found")


def test_a_base_folder_that_changed_since_training_is_refused(tiny_path, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_path, folder)
    lineage = {"base_model": str(folder), "base_commit": base_commit(BaseSpec(str(folder)))}
    assert lineage["base_commit"].startswith("sha256:")
    assert base_spec(lineage).name_or_path == str(folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # same size, other weights
    with pytest.raises(LoadError, match=f"its base {folder} is not the one it trained on: it "
                                        f"trained on {lineage['base_commit']}, and {folder} is "
                                        "now sha256:"):
        base_spec(lineage)


@pytest.mark.slow
def test_version_tags_that_disagree_with_the_run_are_reported_not_followed(optuna_run, tmp_path,
                                                                           capsys):
    client, name = optuna_run.client, tiny_sweeps.REGISTERED
    version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    run = client.get_run(version.run_id)
    commit = base_commit(BaseSpec("tiny"))
    assert run.data.params["model_commit"] == version.tags["qlora.base_commit"] == commit
    forged = {"qlora.base_model": str(tmp_path / "somebody-elses-model"),
              "qlora.base_trust_remote_code": "True"}
    for key, value in forged.items():
        client.set_model_version_tag(name, version.version, key, value)
    try:
        ref, uri = f"models:/{name}@{CHAMPION_ALIAS}", optuna_run.config.tracking.uri
        loaded = load_adapter(ref, uri, device="cpu", dst=tmp_path / "download")
        assert loaded.lineage["base_model"] == "tiny" and loaded.base.spec.name_or_path == "tiny"
        assert not loaded.base.spec.trust_remote_code
        assert main([ref, "--tracking-uri", uri, "--prompt", "abc", "--max-new-tokens", "1",
                     "--device", "cpu"]) == 0
        from orchestrator.export import BASE_FILE
        from orchestrator.export import main as export

        assert export([ref, str(tmp_path / "exported"), "--tracking-uri", uri]) == 0
        written = json.loads((tmp_path / "exported" / BASE_FILE).read_text())
        assert written["base_model"] == "tiny" and written["base_commit"] == commit
    finally:
        client.set_model_version_tag(name, version.version, "qlora.base_model", "tiny")
        client.set_model_version_tag(name, version.version, "qlora.base_trust_remote_code",
                                     run.data.params["model_trust_remote_code"])
    err = capsys.readouterr().err
    assert (f"warning: {ref}: tag qlora.base_model={forged['qlora.base_model']} disagrees with "
            f"run {version.run_id}'s record (tiny); the run's record is used") in err
    assert "tag qlora.base_trust_remote_code=True disagrees" in err
    assert err.count(f"tag qlora.base_model={forged['qlora.base_model']} disagrees") == 2  # export
