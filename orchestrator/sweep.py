"""`run_sweep(config)`: one sweep from trials to leaderboard.

In the order it runs:

1. **Expand** the sweep into trials (`orchestrator.search`), each with a stable id.
2. **Open the ledger** (`Tracker`): the experiment, the parent run, one child run per trial.
   A store that cannot be opened is a config error (exit 2) found before Ray starts.
3. **Connect** to Ray (`cluster.connect`) and **plan** packs for that many workers.
4. **Dispatch** packs; every poll, streamed metrics go to the tracker (buffered) and the console,
   and each ended pack's trials are recorded: adapter written under
   `<output_dir>/<sweep>/<trial>/adapter/`, logged as the run's `adapter/` artifacts, run ended.
5. **Summarise**: leaderboard, `summary.json` beside the adapters, exit status 0 when every trial
   finished (or was stopped by the search) and 1 otherwise.

If anything raises or the user presses Ctrl-C, the tracker ends every open run (FAILED or KILLED)
and the workers are torn down; Ray is shut down only if this sweep started it.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path

from mlflow.exceptions import MlflowException

from orchestrator.cluster import (
    MetricsEvent,
    PackOutcome,
    PackStarted,
    Placement,
    TrialEnded,
    connect,
    disconnect,
    dispatch,
)
from orchestrator.console import Console
from orchestrator.errors import ConfigError
from orchestrator.planner import Pack, plan
from orchestrator.schema import Config
from orchestrator.search import Trial, expand
from orchestrator.tracking import DEVICES_TAG, NODE_TAG, PACK_TAG, Tracker, is_success
from qlora import TrialResult, write_adapter

SUMMARY_FILE = "summary.json"


def run_sweep(config: Config) -> int:
    """Run every trial of `config`'s sweep; 0 if all finished, 1 if any failed, 2 on a bad setup.

    Bad setup (store or cluster unreachable) prints one `error:` line naming the key.
    """
    trials = expand(config)
    try:
        tracker = _open_tracker(config)
        workers = connect(config.cluster)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(config.output_dir) / _safe(config.sweep.name)
    console = Console(trials)
    try:
        packs = plan(trials, config.pack.max_adapters, workers.num_workers)
        with tracker:
            tracker.start_sweep(config, trials, extra_params={
                "num_workers": workers.num_workers, "gpus_per_worker": workers.gpus_per_worker,
                "num_packs": len(packs)})
            rows = _run(packs, workers, trials, tracker, console, out_dir)
            done = {r["trial_id"] for r in rows}
            failed = [r["trial_id"] for r in rows if not is_success(r["status"])]
            failed += [t.trial_id for t in trials if t.trial_id not in done]  # never reported
            tracker.end_sweep(failed)
    finally:
        console.close()
        disconnect(workers)
    console.summary(config.sweep.name, rows, adapters_dir=str(out_dir),
                    parent_run_id=tracker.parent_run_id, tracking_uri=tracker.uri,
                    experiment=tracker.experiment_name)
    exit_code = 1 if failed else 0
    _write_summary(out_dir / SUMMARY_FILE, config, tracker, rows, exit_code)
    return exit_code


def _open_tracker(config: Config) -> Tracker:
    try:
        return Tracker(config.tracking)
    except (MlflowException, OSError) as e:
        raise ConfigError("tracking.uri", f"cannot open {config.tracking.uri}: {e}") from e


def _run(packs: list[Pack], workers, trials: list[Trial], tracker: Tracker, console: Console,
         out_dir: Path) -> list[dict]:
    """Dispatch the packs and record every trial as its pack ends; returns the summary rows."""
    by_id = {t.trial_id: t for t in trials}
    folders = _folder_names(trials)
    pack_trials = {p.pack_id: [t.trial_id for t in p.trials] for p in packs}
    announced: set[str] = set()  # trials whose end the console has shown
    rows: dict[str, dict] = {}
    with contextlib.closing(dispatch(packs, workers)) as batches:
        for events in batches:
            for ev in events:
                if isinstance(ev, MetricsEvent):
                    tracker.log_metrics(ev.trial_id, ev.step, ev.metrics, ev.time)
                    console.metrics(ev.trial_id, ev.step, ev.metrics)
                elif isinstance(ev, PackStarted):
                    console.pack_started(ev.pack_id, pack_trials[ev.pack_id], ev.placement)
                elif isinstance(ev, TrialEnded):
                    announced.add(ev.trial_id)
                    console.trial_ended(ev.trial_id, ev.status, ev.steps, ev.eval_loss, ev.reason)
                elif isinstance(ev, PackOutcome):
                    for result in ev.results:
                        if result.trial_id not in announced:
                            console.trial_ended(result.trial_id, result.status, result.steps,
                                                result.eval_loss, result.reason)
                        trial = by_id[result.trial_id]
                        rows[trial.trial_id] = _record(
                            trial, result, ev, tracker, out_dir / folders[trial.trial_id])
            tracker.flush()
    return [rows[t.trial_id] for t in trials if t.trial_id in rows]


def _record(trial: Trial, result: TrialResult, outcome: PackOutcome, tracker: Tracker,
            folder: Path) -> dict:
    """Save a trial's adapter locally, end its run in MLflow, and return its summary row."""
    adapter_dir = None
    if result.adapter:
        # The local copy is promised to users; MLflow gets the same files from it.
        adapter_dir = write_adapter(result.adapter, folder / "adapter")
    placement: Placement | None = outcome.placement
    tags = {PACK_TAG: outcome.pack_id}
    if placement is not None:
        tags[NODE_TAG] = placement.node_id
        if placement.cuda_visible_devices is not None:
            tags[DEVICES_TAG] = placement.cuda_visible_devices
    tracker.end_trial(result, adapter_dir, tags)
    return {
        "trial_id": trial.trial_id,
        "name": trial.name,
        "params": trial.params,
        "lora_r": trial.spec.r,
        "lora_alpha": trial.spec.alpha,
        "learning_rate": trial.spec.learning_rate,
        "status": result.status,
        "steps": result.steps,
        "eval_loss": result.eval_loss,
        "reason": result.reason,
        "run_id": tracker.run_ids[trial.trial_id],
        "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
        "pack_id": outcome.pack_id,
        "pack_started": outcome.started,
        "pack_ended": outcome.ended,
        "placement": asdict(placement) if placement is not None else None,
    }


def _write_summary(path: Path, config: Config, tracker: Tracker, rows: list[dict],
                   exit_code: int) -> None:
    summary = {
        "sweep": config.sweep.name,
        "exit_code": exit_code,
        "experiment": tracker.experiment_name,
        "tracking_uri": tracker.uri,
        "parent_run_id": tracker.parent_run_id,
        "trials": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def _json_safe(obj):
    # A diverged trial's NaN is not JSON; null says "no number" to every reader.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _folder_names(trials: list[Trial]) -> dict[str, str]:
    names = [_safe(t.name or t.trial_id) for t in trials]
    return {t.trial_id: (n if names.count(n) == 1 else f"{n}-{t.trial_id}")
            for t, n in zip(trials, names, strict=True)}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._") or "sweep"
