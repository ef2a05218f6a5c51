"""A user's own files, each run through `python -m orchestrator data.path=...` to finished trials."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

FAST = ["train.max_steps=4", "train.seq_len=128", "train.micro_batch_size=2",
        "train.eval_every=0", "data.max_eval_examples=8", "cluster.num_workers=1"]


def _words(i: int) -> list[str]:
    pool = ["pear", "fig", "kiwi", "lime", "plum", "date", "apple", "melon"]
    return [pool[(i + k) % len(pool)] for k in range(3)]


def write_alpaca(path: Path, n: int = 40) -> Path:
    with path.open("w") as f:
        for i in range(n):
            w = _words(i)
            f.write(json.dumps({"instruction": "Sort the words.", "input": " ".join(w),
                                "output": " ".join(sorted(w))}) + "\n")
    return path


def write_chat(path: Path, n: int = 40) -> Path:
    with path.open("w") as f:
        for i in range(n):
            w = _words(i)
            f.write(json.dumps({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reverse: " + " ".join(w)},
                {"role": "assistant", "content": " ".join(reversed(w))}]}) + "\n")
    return path


def write_prompt_completion_csv(path: Path, n: int = 40) -> Path:
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["prompt", "completion"])
        for i in range(n):
            out.writerow([f"{i} + {i + 1} =", f" {2 * i + 1}"])
    return path


WRITERS = {"alpaca.jsonl": write_alpaca, "chat.jsonl": write_chat,
           "prompt_completion.csv": write_prompt_completion_csv}


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _summary(cwd: Path, sweep: str) -> dict:
    return json.loads((cwd / "outputs" / sweep / "latest" / "summary.json").read_text())


@pytest.mark.slow
def test_one_pack_trains_adapters_on_different_datasets(tmp_path):
    paths = [WRITERS[name](tmp_path / name) for name in sorted(WRITERS)]
    values = ", ".join(str(p) for p in paths)
    done = _run(tmp_path, "pack.max_adapters=4", f"++sweep.params={{data.path: [{values}]}}",
                *FAST)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = _summary(tmp_path, "single")["trials"]
    assert len(rows) == 3 and {r["status"] for r in rows} == {"finished"}
    assert len({r["pack_id"] for r in rows}) == 1  # one base, three tasks
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    tags = [client.get_run(r["run_id"]).data.tags for r in rows]
    # Each result is traced to its own data: hash, format and counts recorded on its run.
    assert len({t["qlora.data.data_hash"] for t in tags}) == 3
    assert {t["qlora.data.format"] for t in tags} == {"alpaca", "chat", "prompt_completion"}
    assert all(int(t["qlora.data.n_train"]) > 0 for t in tags)


def test_skip_invalid_reports_the_count_before_training(tmp_path):
    path = write_alpaca(tmp_path / "mixed.jsonl", n=12)
    with path.open("a") as f:
        f.write('{"instruction": "no output"}\n{"output": "no instruction"}\n')
    done = _run(tmp_path, f"data.path={path}", "dry_run=true")
    assert done.returncode == 2 and "line 13" in done.stderr
    done = _run(tmp_path, f"data.path={path}", "data.skip_invalid=true", "dry_run=true")
    assert done.returncode == 0, done.stderr
    assert "2 invalid rows will be skipped" in done.stderr and "12 kept" in done.stderr


@pytest.mark.slow
def test_a_mixture_records_each_source_share_and_eval_loss(ray_session, tmp_path):
    from orchestrator.config.compose import compose
    from orchestrator.config.validate import validate
    from orchestrator.preflight import preflight
    from orchestrator.sweep import run_sweep

    alpaca, chat = write_alpaca(tmp_path / "sorting.jsonl"), write_chat(tmp_path / "reversing.jsonl")
    config = validate(compose([
        f"data.mix=[{{path: {alpaca}, weight: 3}}, {{path: {chat}}}]", *FAST,
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"output_dir={tmp_path / 'outputs'}",
        f"tracking.artifact_location={tmp_path / 'mlartifacts'}"]))
    preflight(config)
    assert run_sweep(config) == 0
    [row] = _summary(tmp_path, "single")["trials"]
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(row["run_id"])
    tags, metrics = run.data.tags, run.data.metrics
    assert (tags["qlora.data.format"], tags["qlora.data.share_sorting"],
            tags["qlora.data.share_reversing"]) == ("mix", "0.75", "0.25")
    assert {"eval_loss", "eval_loss_sorting", "eval_loss_reversing"} <= set(metrics)
    low, high = sorted([metrics["eval_loss_sorting"], metrics["eval_loss_reversing"]])
    assert low < metrics["eval_loss"] < high
