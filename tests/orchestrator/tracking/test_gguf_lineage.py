"""A base converted from a GGUF file: every trial run, and the registered version's lineage, name
the file and its sha256."""

from __future__ import annotations

import hashlib

from orchestrator.config.schema import Config, ModelCfg, SweepDef, TrackingCfg
from orchestrator.search.expand import expand
from orchestrator.tracking.keys import BASE_TAG_PREFIX, LINEAGE_PREFIX
from orchestrator.tracking.registry import lineage
from orchestrator.tracking.tracker import Tracker


def test_trial_runs_and_lineage_name_the_gguf_file(tmp_path):
    gguf = tmp_path / "model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    config = Config(model=ModelCfg(name_or_path=str(gguf)),
                    tracking=TrackingCfg(uri=f"sqlite:///{tmp_path}/mlflow.db",
                                         artifact_location=str(tmp_path / "mlartifacts")),
                    sweep=SweepDef(name="gguf", params={"lora.r": [2, 4]}),
                    output_dir=str(tmp_path / "outputs"))
    trials = expand(config)
    tracker = Tracker(config.tracking)
    tracker.start_sweep(config, trials)
    want = {"gguf_file": str(gguf.resolve()),
            "gguf_sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    for trial in trials:
        run = tracker.client.get_run(tracker.run_ids[trial.trial_id])
        got = {k[len(BASE_TAG_PREFIX):]: v for k, v in run.data.tags.items()
               if k.startswith(BASE_TAG_PREFIX)}
        assert got == want
        tags = lineage(run, sweep="gguf", parent_run_id=None, eval_loss=None,
                       trial_id=trial.trial_id)
        assert tags[LINEAGE_PREFIX + "base_gguf_sha256"] == want["gguf_sha256"]
        assert tags[LINEAGE_PREFIX + "base_gguf_file"] == want["gguf_file"]
    tracker.end_sweep([])
