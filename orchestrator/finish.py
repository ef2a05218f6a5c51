"""What a sweep leaves besides its runs: the search's figures, the best adapter, the report.

`finish_sweep` runs once every trial has been recorded, before the parent run ends:

1. **Figures**: the best trial (best final `sweep.objective` among those that finished), the training
   steps the sweep spent and those it would have spent had every trial run to its `max_steps`
   (a grid's cost; ASHA's saving is their ratio). On the parent run as tags and metrics, in
   `summary.json` under `search`, and printed. The leaderboard goes in the parent run's
   description (markdown), so the MLflow UI shows the result on the run's page.
2. **Registry** (`tracking.register_as=NAME`): the best adapter as `models:/NAME@champion`.
3. **Report**: the plots of `orchestrator.report`, written beside `summary.json` and logged to
   the parent run under `report/`.

None of these may lose the sweep's results: a failure is reported as a warning line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config.schema import Config
from orchestrator.search.objective import Objective, leaderboard_markdown
from orchestrator.tracking.keys import (
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    CHAMPION_ALIAS,
    NOTE_TAG,
    REGISTERED_TAG,
    REPORT_DIR,
)
from orchestrator.tracking.tracker import Tracker
from qlora.config import TrialStatus


@dataclass
class Finish:
    """What `finish_sweep` produced: the summary's `search` section and lines to print."""

    summary: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def best_row(rows: list[dict], objective: Objective | None = None) -> dict | None:
    """The finished trial with the best final objective (default: the lowest eval_loss), or None."""
    return (objective or Objective()).best(rows)


def figures(rows: list[dict], trials, objective: Objective | None = None) -> dict:
    """The best trial and the steps spent, against every trial run to its end."""
    objective = objective or Objective()
    steps = sum(int(r.get("steps") or 0) for r in rows)
    full = sum(t.spec.max_steps for t in trials)
    best = best_row(rows, objective)
    return {
        "num_trials": len(trials),
        "stopped_early": sum(r.get("status") == TrialStatus.STOPPED for r in rows),
        "training_steps": steps,
        "training_steps_if_all_ran": full,
        "steps_ratio": steps / full if full else None,
        "best_trial_id": best["trial_id"] if best else None,
        "best_trial": best["name"] if best else None,
        "best_eval_loss": best["eval_loss"] if best else None,
        "objective": objective.metric,
        "mode": objective.mode,
        f"best_{objective.metric}": objective.of_row(best) if best else None,
        "best_run_id": best["run_id"] if best else None,
    }


def finish_sweep(config: Config, tracker: Tracker, rows: list[dict], trials,
                 out_dir: Path) -> Finish:
    """Figures, registry and report for a sweep whose trials are all recorded (see above)."""
    objective = Objective.of(config)
    done = Finish(summary=figures(rows, trials, objective))
    fig = done.summary
    best = best_row(rows, objective)
    if best is not None:
        done.lines += [
            f"best:       {objective.metric} {fig['best_' + objective.metric]:.4f} "
            f"({fig['best_trial']}, {objective.mode})",
            f"steps:      {fig['training_steps']} training steps, x{fig['steps_ratio']:.2f} of the "
            f"{fig['training_steps_if_all_ran']} of every trial run to its end "
            f"({fig['stopped_early']} of {fig['num_trials']} stopped early)",
        ]
    _warn_on_error(done, "search figures", lambda: _log_figures(tracker, fig))
    _warn_on_error(done, "leaderboard", lambda: tracker.set_sweep_tags({NOTE_TAG: leaderboard_markdown(
        rows, objective, f"sweep {config.sweep.name}: {len(rows)} trials")}))
    if config.tracking.register_as:
        if best is None or not best.get("adapter_dir"):
            done.lines.append(f"warning: tracking.register_as={config.tracking.register_as}: no "
                              "finished trial with an adapter to register")
        else:
            _warn_on_error(done, "registry", lambda: _register(config, tracker, best, done))
    _warn_on_error(done, "report", lambda: _report(tracker, out_dir, done))
    return done


def _log_figures(tracker: Tracker, fig: dict) -> None:
    if tracker.parent_run_id is None:
        return
    if fig["best_trial_id"]:
        tracker.set_sweep_tags({BEST_TRIAL_TAG: fig["best_trial_id"],
                                BEST_RUN_TAG: fig["best_run_id"]})
    keys = ("best_eval_loss", f"best_{fig['objective']}", "training_steps",
            "training_steps_if_all_ran", "steps_ratio")
    metrics = {k: fig[k] for k in keys if fig[k] is not None}
    tracker.log_sweep_metrics(metrics)


def _register(config: Config, tracker: Tracker, best: dict, done: Finish) -> None:
    name = config.tracking.register_as
    version = tracker.register(name, best, sweep=config.sweep.name, objective=Objective.of(config))
    uri = f"models:/{name}/{version.version}"
    tracker.set_sweep_tags({REGISTERED_TAG: uri})
    done.summary["registered"] = {"name": name, "version": int(version.version),
                                  "alias": CHAMPION_ALIAS, "uri": f"models:/{name}@{CHAMPION_ALIAS}"}
    done.lines += [f"registered: {uri}, alias {CHAMPION_ALIAS} ({best['name']})",
                   f"            python -m orchestrator.load models:/{name}@{CHAMPION_ALIAS} "
                   f"--tracking-uri {tracker.uri} --prompt TEXT"]


def _report(tracker: Tracker, out_dir: Path, done: Finish) -> None:
    from orchestrator.report import report_for

    parent = tracker.client.get_run(tracker.parent_run_id)
    paths = report_for(tracker.client, parent, out_dir, log=False)
    tracker.log_sweep_files(paths, REPORT_DIR)
    done.summary["report"] = [str(p) for p in paths]
    done.lines += [f"report:     {path} (and report/ on the parent run)" for path in paths]


def _warn_on_error(done: Finish, what: str, step) -> None:
    try:
        step()
    except Exception as e:  # the trials are recorded already; this must not lose them
        text = str(e).strip().splitlines()
        done.lines.append(f"warning: {what} failed: {type(e).__name__}: "
                          f"{text[0] if text else ''}")
