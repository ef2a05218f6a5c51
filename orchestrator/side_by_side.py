"""The best trials' answers to the same prompts, side by side: `samples_side_by_side.md`.

Built from MLflow alone (for the sweep that just ended or any past one, by `orchestrator.report`):
the sweep's `sweep.objective` and `sweep.mode` (params of the parent run) rank its trial runs; the
best `TOP` that logged samples give their last table (`samples/step_NNNNNN.json`). Every trial of a
sweep on the same data answers the same prompts (the first of the eval split), so the rows line
up by prompt. One section per prompt: the prompt, the reference, then each trial's answer with
its exact match.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from orchestrator.search.objective import Objective
from orchestrator.tracking.keys import SAMPLES_DIR
from qlora.config import TrialStatus

SIDE_BY_SIDE = "samples_side_by_side.md"
TOP = 3  # trials compared


def objective_of(parent) -> Objective:
    """The objective a sweep ran with (its parent run's params; eval_loss/min before they existed)."""
    params = parent.data.params
    return Objective(params.get("sweep_objective", "eval_loss"), params.get("sweep_mode", "min"))


def last_samples(client, run_id: str) -> tuple[int, list[dict]] | None:
    """(step, rows) of a run's latest samples table, or None when it logged none."""
    files = [f.path for f in client.list_artifacts(run_id, SAMPLES_DIR)
             if f.path.endswith(".json")]
    if not files:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per file
    latest = max(files, key=lambda p: int(Path(p).stem.rsplit("_", 1)[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(client.download_artifacts(run_id, latest, tmp)).read_text())
    rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
    return int(Path(latest).stem.rsplit("_", 1)[-1]), rows


def write_side_by_side(client, parent, trials, path: Path, top: int = TOP) -> Path | None:
    """The markdown file comparing the `top` best trials' last answers; None without samples.
    `trials` are `orchestrator.report.TrialCurves` (run id, name, status, final metrics)."""
    objective = objective_of(parent)
    rows = [{"name": t.name, "status": t.status if t.status in set(TrialStatus) else "failed",
             "eval_loss": t.metrics.get("eval_loss"), "eval_metrics": t.metrics, "run": t}
            for t in trials]
    picked = []
    for row in objective.ranked(rows):
        if len(picked) == top or not TrialStatus(row["status"]).succeeded:
            break
        got = last_samples(client, row["run"].run_id)
        if got is not None:
            picked.append((row, *got))
    if not picked:
        return None
    lines = [f"# {parent.info.run_name}: the best {len(picked)} trials' answers",
             "", f"Ranked by `{objective.metric}` ({objective.mode}); each trial's last evaluation.",
             ""]
    for row, step, _ in picked:
        lines.append(f"- **{row['name']}** (step {step}): {objective.metric} = "
                     f"{objective.of_row(row)}")
    by_prompt: dict[str, dict] = {}
    for row, _, samples in picked:
        for s in samples:
            entry = by_prompt.setdefault(s["prompt"], {"reference": s.get("reference"), "answers": {}})
            entry["answers"][row["name"]] = s
    for i, (prompt, entry) in enumerate(by_prompt.items(), 1):
        lines += ["", f"## {i}", "", "```", prompt.rstrip(), "```", "",
                  f"reference: `{inline(entry['reference'])}`", "",
                  "| trial | answer | exact_match |", "|---|---|---|"]
        for row, _, _ in picked:
            s = entry["answers"].get(row["name"])
            answer, em = ("-", "-") if s is None else (f"`{inline(s['prediction'])}`",
                                                       f"{s.get('exact_match', 0):g}")
            lines.append(f"| {row['name']} | {answer} | {em} |")
    path.write_text("\n".join(lines) + "\n")
    return path


def inline(text) -> str:
    """`text` on one line of a markdown table: newlines shown as \\n, pipes and backticks escaped."""
    return str(text or "").replace("\n", "\\n").replace("|", "\\|").replace("`", "'")
