"""Day two: a rerun and a Hydra `-m` never replace earlier files; what the UI and the store show."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.console import ui_lines
from orchestrator.tracking.keys import (
    LR_METRIC,
    ROLE_TAG,
    RUNS_VIEW_COLUMNS,
    RUNS_VIEW_KEY,
    RUNS_VIEW_TAG,
    TRIAL_SEED_TAG,
    _param_value,
)
from tests.orchestrator.test_user_data import FAST, _run, write_chat

QUICK = [*FAST[1:], "train.max_steps=2"]


def _files(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _run_folders(cwd: Path, sweep: str) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / sweep).iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name != "checkpoints")


@pytest.mark.slow
def test_reruns_and_multirun_keep_every_earlier_file(tmp_path):
    # The first run also trains on a user's own file through the top-level key, to the end.
    same = [f"data.path={write_chat(tmp_path / 'chat.jsonl')}", *QUICK]
    first = _run(tmp_path, *same)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    [run1] = _run_folders(tmp_path, "single")
    assert list(run1.glob("*/adapter/*.safetensors"))
    rows = json.loads((run1 / "summary.json").read_text())["trials"]
    assert [r["status"] for r in rows] == ["finished"] and math.isfinite(rows[0]["eval_loss"])
    before = _files(tmp_path / "outputs")

    again = _run(tmp_path, *same)  # the same sweep again
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    runs = _run_folders(tmp_path, "single")
    assert len(runs) == 2 and run1 in runs
    latest = (tmp_path / "outputs" / "single" / "latest").resolve()
    assert latest == [r for r in runs if r != run1][0]  # the link follows the newest run
    after_rerun = _files(tmp_path / "outputs")
    assert {k: after_rerun.get(k) for k in before} == before  # byte for byte

    multi = _run(tmp_path, "-m", "lora.r=4,8", *same)
    assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-2000:]
    after_multi = _files(tmp_path / "outputs")
    assert {k: after_multi.get(k) for k in after_rerun} == after_rerun
    for job in ("single-lora.r=4", "single-lora.r=8"):  # each job its own sweep and folder
        [folder] = _run_folders(tmp_path, job)
        assert (folder / "summary.json").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [exp] = [e for e in client.search_experiments() if e.name == "qlora-sweeps"]
    runs = client.search_runs([exp.experiment_id])
    parents = sorted(r.info.run_name for r in runs if r.data.tags.get(ROLE_TAG) == "sweep")
    assert parents == ["single", "single", "single-lora.r=4", "single-lora.r=8"]

    # What the UI shows: params in their natural form, the seed a tag, the schedule as `lr`.
    child = next(r for r in runs if r.data.tags.get(ROLE_TAG) == "trial")
    assert child.data.params["lora_alpha"] == "32" and child.data.params["lora_r"].isdigit()
    assert "trial_seed" not in child.data.params and child.data.tags[TRIAL_SEED_TAG].isdigit()
    assert LR_METRIC in child.data.metrics and "learning_rate" not in child.data.metrics
    # Quiet, and logged: no Ray or MLflow start-up chatter; the console's lines in Hydra's log.
    for noise in ("Token authentication is enabled", "SIGTERM handler is not set",
                  "Creating initial MLflow database tables"):
        assert noise not in first.stderr + first.stdout, noise
    [log] = sorted((tmp_path / "outputs" / ".hydra").glob("*/orchestrator.log"))[:1]
    assert "sweep single: 1 of 1 trials finished" in log.read_text()
    assert "finished after 2 steps" in log.read_text()
    # The view the URL opens: the four columns, best eval_loss first, the latest sweep expanded.
    view = json.loads(exp.tags[RUNS_VIEW_TAG])
    assert view["selectedColumns"] == list(RUNS_VIEW_COLUMNS) and view["orderByAsc"] is True
    latest_parent = max((r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"),
                        key=lambda r: r.info.start_time)
    assert view["runsExpanded"] == {latest_parent.info.run_id: True}
    url = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType="
    assert url in first.stdout and "mlflow ui --backend-store-uri sqlite:///mlflow.db" in first.stdout


def test_ui_lines_name_the_runs_page_and_how_to_serve_it(tmp_path):
    [only] = ui_lines("http://10.0.0.5:5000/", "7")
    assert only.endswith("http://10.0.0.5:5000/#/experiments/7/runs?workflowType=machine_learning"
                         f"&viewStateShareKey={RUNS_VIEW_KEY}")
    serve, page = ui_lines("sqlite:///mlflow.db", "3", cwd=tmp_path)  # a wheel: no Makefile
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in serve
    assert "/#/experiments/3/runs?workflowType=machine_learning&" in page
    (tmp_path / "Makefile").write_text("all:\n\ttrue\nui: install\n\tmlflow ui\n")
    assert ui_lines("sqlite:///mlflow.db", "3", cwd=tmp_path)[0].endswith("make ui")
    assert "mlflow ui" in ui_lines("sqlite:////elsewhere/m.db", "3", cwd=tmp_path)[0]


def test_params_are_logged_in_their_natural_form():
    assert [_param_value(v) for v in (32.0, 16, 0.002, 1e-5, True, None)] == [
        "32", "16", "0.002", "1e-05", "True", "None"]
    assert _param_value({"q_proj": 8}) == '{"q_proj": 8}'
    assert _param_value(["q_proj", "v_proj"]) == "q_proj,v_proj"
