"""What a sweep prints: live progress while trials train, then a leaderboard.

On a terminal each trial gets a rich progress bar (steps, last train_loss, status). Elsewhere (CI,
a pipe, a log file) the same events become plain lines, throttled to about five per trial plus
evaluations and ends, so a log stays readable. The leaderboard sorts finished trials by
eval_loss and says where the adapters are and how to open the MLflow UI.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich import box
from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.search.objective import Objective, base_cells
from orchestrator.tracking.keys import RUNS_VIEW_KEY
from qlora.config import TrialStatus

if TYPE_CHECKING:
    from orchestrator.cluster.events import Placement
    from orchestrator.search.trials import Trial

PLAIN_WIDTH = 120  # rich's 80-column default for non-terminals wraps the leaderboard
LINES_PER_TRIAL = 5  # plain mode: progress lines per trial, besides evaluations and the end


class Console:
    """Progress of one sweep's trials, fed by the driver as events arrive."""

    def __init__(self, trials: list[Trial], stream: TextIO | None = None,
                 live: bool | None = None):
        """`live` None: rich progress bars on a terminal, plain lines otherwise."""
        stream = stream or sys.stdout
        probe = RichConsole(file=stream)
        self.live = probe.is_terminal and not probe.is_dumb_terminal if live is None else live
        self.rich = RichConsole(file=stream, highlight=False,
                                width=None if self.live else PLAIN_WIDTH)
        self._log = _log_console()  # Hydra's orchestrator.log of this run, if there is one
        self._trials = {t.trial_id: t for t in trials}
        self._every = {t.trial_id: max(1, math.ceil(t.spec.max_steps / LINES_PER_TRIAL))
                       for t in trials}
        self._progress: Progress | None = None
        self._tasks: dict[str, int] = {}
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[state]}"),
                TimeElapsedColumn(), console=self.rich, transient=False,
            )
            for t in trials:
                self._tasks[t.trial_id] = self._progress.add_task(
                    t.name, total=t.spec.max_steps, loss="", state="queued", start=False)
            self._progress.start()

    def add_trial(self, trial: Trial) -> None:
        """A trial proposed after the sweep started (Optuna's later rounds)."""
        self._trials[trial.trial_id] = trial
        self._every[trial.trial_id] = max(1, math.ceil(trial.spec.max_steps / LINES_PER_TRIAL))
        if self._progress is not None:
            self._tasks[trial.trial_id] = self._progress.add_task(
                trial.name, total=trial.spec.max_steps, loss="", state="queued", start=False)

    def print(self, text: str) -> None:
        """A line above the progress bars (or in the log), and in Hydra's `orchestrator.log`."""
        self.rich.print(text, markup=False, soft_wrap=True)  # a URL or path stays one line
        if self._log is not None:
            self._log.print(text, markup=False, soft_wrap=True)

    def pack_started(self, pack_id: str, trial_ids: list[str],
                     placement: Placement | None) -> None:
        """A worker began a pack."""
        where = _where(placement)
        if self._progress is not None:
            for tid in trial_ids:
                self._progress.start_task(self._tasks[tid])
                self._progress.update(self._tasks[tid], state="training")
        names = ", ".join(self._name(t) for t in trial_ids)
        self.print(f"{pack_id} started on {where}: {names}")

    def workers_waiting(self, waiting: int, total: int, asks: str, since: float,
                        cluster: dict) -> None:
        """Workers that Ray has not placed yet, while packs wait for them."""
        have = ", ".join(f"{v:g} {k}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU"))
        stamp = time.strftime("%H:%M:%S", time.localtime(since))
        self.print(f"waiting since {stamp} ({time.time() - since:.0f} s) for {waiting} of {total} "
                   f"worker(s) to be placed, each asking {asks} (the cluster had {have or 'none'} "
                   "when the sweep began); `ray status` shows what is free")

    def metrics(self, trial_id: str, step: int, metrics: dict[str, float]) -> None:
        """A streamed metrics point of one trial."""
        if self._progress is not None:
            fields = {"completed": step}
            if "train_loss" in metrics:
                fields["loss"] = f"loss {metrics['train_loss']:.4f}"
            if "eval_loss" in metrics:
                fields["loss"] = f"eval {metrics['eval_loss']:.4f}"
            self._progress.update(self._tasks[trial_id], **fields)
            return
        total = self._trials[trial_id].spec.max_steps
        if "eval_loss" in metrics:
            scores = "".join(f"  {k} {metrics[k]:.3f}" for k in ("eval_exact_match", "eval_token_f1")
                             if k in metrics)
            self.print(f"{self._name(trial_id)}  step {step}/{total}  "
                       f"eval_loss {metrics['eval_loss']:.4f}{scores}")
        elif "train_loss" in metrics and (step % self._every[trial_id] == 0 or step == 1):
            self.print(f"{self._name(trial_id)}  step {step}/{total}  "
                       f"train_loss {metrics['train_loss']:.4f}")

    def trial_ended(self, trial_id: str, status: str, steps: int, eval_loss: float | None,
                    reason: str | None) -> None:
        """A trial finished, diverged, stopped or failed."""
        loss = f"eval_loss {eval_loss:.4f}" if eval_loss is not None else ""
        if self._progress is not None:
            self._progress.update(self._tasks[trial_id], state=status)
            self._progress.stop_task(self._tasks[trial_id])
        text = f"{self._name(trial_id)}  {status} after {steps} steps  {loss}".rstrip()
        self.print(text + (f"  ({reason})" if reason and status != TrialStatus.FINISHED else ""))

    def close(self) -> None:
        """Stop the live display (safe to call twice)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, sweep_name: str, rows: list[dict], *, adapters_dir: str,
                parent_run_id: str | None, tracking_uri: str, experiment: str,
                objective: Objective | None = None, experiment_id: str | None = None) -> None:
        """The leaderboard (best `objective` first, default eval_loss), failures with reasons,
        and where things are.

        `rows` hold name, lora_r, lora_alpha, learning_rate, eval_loss, eval_metrics, status, reason.
        """
        self.close()
        objective = objective or Objective()
        ranked = objective.ranked(rows)
        other = [] if objective.metric == "eval_loss" else [objective.metric]
        failed = [r for r in rows if not TrialStatus(r["status"]).succeeded]
        table = Table(title=f"sweep {sweep_name}: {len(rows) - len(failed)} of {len(rows)} "
                            "trials finished", box=box.SIMPLE_HEAD, title_justify="left")
        for col, justify in (("#", "right"), ("trial", "left"), ("rank", "right"),
                             ("alpha", "right"), ("lr", "right"), ("eval_loss", "right"),
                             *((m, "right") for m in other), ("quant", "left"),
                             ("bits/w", "right"), ("peak MiB", "right"), ("status", "left")):
            table.add_column(col, justify=justify, no_wrap=True)
        for i, r in enumerate(ranked, 1):
            eval_loss = r.get("eval_loss")
            table.add_row(str(i), r["name"], str(r["lora_r"]), f"{r['lora_alpha']:g}",
                          f"{r['learning_rate']:g}",
                          "-" if eval_loss is None else f"{eval_loss:.4f}",
                          *(_num(objective.of_row(r)) for _ in other), *base_cells(r),
                          r["status"])
        self.rich.print(table)
        if self._log is not None:
            self._log.print(table)
        for r in failed:
            self.print(f"{r['status']}: {r['name']}: {r.get('reason') or 'no reason given'}")
        self.print(f"adapters:   {adapters_dir}/<trial>/adapter")
        self.print(f"MLflow:     parent run {parent_run_id} in experiment '{experiment}' "
                   f"at {tracking_uri}")
        for line in ui_lines(tracking_uri, experiment_id):
            self.print(line)

    def _name(self, trial_id: str) -> str:
        trial = self._trials.get(trial_id)
        return trial.name if trial is not None else trial_id


def _log_console() -> RichConsole | None:
    """A plain console appending to the file of each logging FileHandler Hydra set up for this
    job (its `orchestrator.log`), so the log holds what the user saw; None outside Hydra."""
    import logging

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.stream is not None:
            return RichConsole(file=handler.stream, width=PLAIN_WIDTH, highlight=False,
                               color_system=None, force_terminal=False, soft_wrap=False)
    return None


MLFLOW_UI = "http://127.0.0.1:5000"  # where `make ui` and `mlflow ui` serve by default


def ui_lines(tracking_uri: str, experiment_id: str | None, cwd: Path | None = None) -> list[str]:
    """Where to see the sweep: the URL of the experiment's runs table in MLflow's machine learning
    view (not the GenAI overview it opens on), and for a local store the command that serves it:
    `make ui` in a checkout that has the target, else `mlflow ui ...` (an installed wheel)."""
    http = tracking_uri.startswith(("http://", "https://"))
    base = tracking_uri.rstrip("/") if http else MLFLOW_UI
    page = (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_KEY}" if experiment_id else base)
    if http:
        return [f"UI:         {page}"]
    makefile = (cwd or Path.cwd()) / "Makefile"
    has_target = makefile.is_file() and "\nui:" in "\n" + makefile.read_text(errors="replace")
    serve = ("make ui" if has_target and tracking_uri == "sqlite:///mlflow.db"
             else f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return [f"UI:         {serve}", f"            then open {page}"]


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _where(placement: Placement | None) -> str:
    if placement is None:
        return "a worker"
    device = (f"GPU {placement.cuda_visible_devices}" if placement.gpu_ids
              else "CPU")
    return f"node {placement.node_id[:8]} pid {placement.pid} ({device})"
