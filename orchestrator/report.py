"""A sweep's report: PNG plots built from MLflow alone, for the sweep that just ended or any past one.

- `loss_curves.png`   : train_loss and eval_loss against step for every trial (stopped trials
                        dashed and ending in a cross, so a search's early stops show).
- `eval_vs_params.png`: each trial's last eval_loss against lora_r, lora_alpha and learning_rate
                        (log scales; hollow markers for stopped trials, a star on the best).
- `samples_side_by_side.md`: the best trials' (by `sweep.objective`) generated answers to the same
                        prompts, with the reference (`orchestrator.side_by_side`).

At the end of every sweep they are written beside `summary.json` and logged to the parent run
under `report/`. To rebuild them for a past sweep:

    python -m orchestrator.report --sweep grid                 # the latest sweep named grid
    python -m orchestrator.report --run-id PARENT_RUN_ID --out plots/ --log
    (--tracking-uri sqlite:///mlflow.db and --experiment qlora-sweeps are the defaults)

Matplotlib draws through its Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.tracking.keys import (
    EVAL_LOSS,
    PARENT_TAG,
    REPORT_DIR,
    ROLE_SWEEP,
    ROLE_TAG,
    STATUS_TAG,
    TRAIN_LOSS,
)
from qlora.config import TrialStatus

LOSS_CURVES = "loss_curves.png"
EVAL_VS_PARAMS = "eval_vs_params.png"
PLOTS = (LOSS_CURVES, EVAL_VS_PARAMS)
_AXES = (("lora_r", "rank (lora_r)", 2), ("lora_alpha", "alpha (lora_alpha)", 2),
         ("learning_rate", "learning rate", 10))
DPI = 110


class ReportError(LookupError):
    """The sweep to report on cannot be found."""


@dataclass
class TrialCurves:
    """What the plots need of one trial run."""

    run_id: str
    name: str
    status: str
    params: dict[str, float]
    train: list[tuple[int, float]] = field(default_factory=list)
    eval: list[tuple[int, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # each metric's last value

    @property
    def final_eval(self) -> float | None:
        finite = [v for _, v in self.eval if math.isfinite(v)]
        return finite[-1] if finite else None


def find_parent(client, experiment: str, sweep: str | None = None, run_id: str | None = None):
    """The parent run `run_id`, or the latest parent run named `sweep` in `experiment`."""
    if run_id:
        return client.get_run(run_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no experiment named {experiment!r}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}' and attributes.run_name = '{sweep}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ReportError(f"no sweep named {sweep!r} in experiment {experiment!r}")
    return runs[0]


def read_trials(client, parent) -> list[TrialCurves]:
    """Every trial run of the sweep `parent` with its curves, in the order they started."""
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"], max_results=50000)
    trials = []
    for run in runs:
        params = {}
        for key, _, _ in _AXES:
            try:
                params[key] = float(run.data.params[key])
            except (KeyError, ValueError):
                pass
        curves = TrialCurves(run.info.run_id, run.info.run_name or run.info.run_id[:8],
                             run.data.tags.get(STATUS_TAG, run.info.status.lower()), params)
        curves.train = _history(client, run.info.run_id, TRAIN_LOSS)
        curves.eval = _history(client, run.info.run_id, EVAL_LOSS)
        curves.metrics = dict(run.data.metrics)
        trials.append(curves)
    return trials


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    points = {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
    return sorted(points.items())


def plot_loss_curves(trials: list[TrialCurves], path: Path, title: str) -> Path:
    """train_loss and eval_loss against step, one line per trial."""
    fig = _figure(13, 5)
    axes = fig.subplots(1, 2)
    colors = _colors(len(trials))
    for trial, color in zip(trials, colors, strict=True):
        style = "--" if trial.status == TrialStatus.STOPPED else "-"
        for ax, points in ((axes[0], trial.train), (axes[1], trial.eval)):
            points = [(s, v) for s, v in points if math.isfinite(v)]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            marker = "o" if ax is axes[1] else None
            ax.plot(steps, values, style, color=color, marker=marker, markersize=3, linewidth=1.2,
                    label=trial.name if ax is axes[1] else None)
            if trial.status == TrialStatus.STOPPED:
                ax.plot(steps[-1], values[-1], "x", color=color, markersize=7)
    for ax, what in zip(axes, (TRAIN_LOSS, EVAL_LOSS), strict=True):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(what)
        ax.set_title(f"{what} of every trial")
        ax.grid(alpha=0.3)
    if 0 < len(trials) <= 24:
        axes[1].legend(fontsize=7, loc="upper right", ncol=1 if len(trials) <= 12 else 2)
    stopped = sum(t.status == TrialStatus.STOPPED for t in trials)
    fig.suptitle(title + (f"  ({stopped} stopped early: dashed, x)" if stopped else ""))
    return _save(fig, path)


def plot_eval_vs_params(trials: list[TrialCurves], path: Path, title: str) -> Path:
    """Each trial's last eval_loss against rank, alpha and learning rate."""
    fig = _figure(15, 4.6)
    axes = fig.subplots(1, 3, sharey=True)
    scored = [t for t in trials if t.final_eval is not None]
    finished = [t for t in scored if t.status == TrialStatus.FINISHED]
    best = min(finished or scored, key=lambda t: t.final_eval, default=None)
    for ax, (key, label, base) in zip(axes, _AXES, strict=True):
        for group, kwargs in (
            ([t for t in scored if t.status != TrialStatus.STOPPED],
             dict(marker="o", color="tab:blue", label="finished")),
            ([t for t in scored if t.status == TrialStatus.STOPPED],
             dict(marker="o", facecolors="none", edgecolors="tab:orange",
                  label="stopped (its last eval)")),
        ):
            points = [(t.params[key], t.final_eval) for t in group if key in t.params]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.scatter(xs, ys, s=36, **kwargs)
        if best is not None and key in best.params:
            ax.scatter([best.params[key]], [best.final_eval], marker="*", s=220, color="tab:red",
                       zorder=3, label=f"best: {best.name}")
        values = [t.params[key] for t in scored if key in t.params]
        if values and min(values) > 0 and max(values) > min(values):
            ax.set_xscale("log", base=base)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final eval_loss")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def build_report(tracking_uri: str, experiment: str, sweep: str | None, out_dir: str | Path,
                 *, run_id: str | None = None, log: bool = False) -> list[Path]:
    """Write the plots of a sweep (its name: the latest such sweep; or its parent `run_id`) into
    `out_dir`, reading MLflow alone; with `log`, also attach them to the parent run under
    `report/`. Returns the PNG paths."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    parent = find_parent(client, experiment, sweep, run_id)
    return report_for(client, parent, out_dir, log=log)


def report_for(client, parent, out_dir: str | Path, *, log: bool = True) -> list[Path]:
    """`build_report` for a parent run already in hand."""
    trials = read_trials(client, parent)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = parent.info.run_name or parent.info.run_id
    title = f"sweep {name}: {len(trials)} trials (parent run {parent.info.run_id[:8]})"
    paths = [plot_loss_curves(trials, out / LOSS_CURVES, title),
             plot_eval_vs_params(trials, out / EVAL_VS_PARAMS, title)]
    from orchestrator.side_by_side import SIDE_BY_SIDE, write_side_by_side

    answers = write_side_by_side(client, parent, trials, out / SIDE_BY_SIDE)
    if answers is not None:
        paths.append(answers)
    if log:
        for path in paths:
            client.log_artifact(parent.info.run_id, str(path), REPORT_DIR)
    return paths


def _figure(width: float, height: float):
    import logging

    from matplotlib.figure import Figure

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font cache notice, once

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)  # a reader never sees half an image
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.report`: rebuild a past sweep's plots; prints their paths."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.report",
        description="Rebuild the plots of a past sweep from MLflow (loss curves; final eval_loss "
                    "against rank, alpha and learning rate).")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sweep", help="the sweep's name (its latest run in the experiment)")
    which.add_argument("--run-id", help="the sweep's parent run id")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default="qlora-sweeps")
    parser.add_argument("--out", help="folder for the PNGs (default: outputs/<sweep>)")
    parser.add_argument("--log", action="store_true",
                        help="also log them to the parent run under report/ (replacing the old)")
    args = parser.parse_args(argv)
    from mlflow.exceptions import MlflowException

    from orchestrator.load import LoadError, store_client

    try:
        client = store_client(args.tracking_uri)  # never an empty store where it runs
    except LoadError as e:
        print(f"error: --tracking-uri: {e}", file=sys.stderr)
        return 2
    try:
        parent = find_parent(client, args.experiment, args.sweep, args.run_id)
        out = args.out or str(Path("outputs") / (parent.info.run_name or parent.info.run_id))
        paths = report_for(client, parent, out, log=args.log)
    except (ReportError, MlflowException) as e:
        key = "--run-id" if args.run_id else "--sweep"
        print(f"error: {key}: {str(e).splitlines()[0]} (at {args.tracking_uri})", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
