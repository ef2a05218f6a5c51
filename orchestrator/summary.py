"""A sweep's summary: one row per trial, `summary.json`, and the trials' folder names.

`record_trial` writes a finished pack's trial to disk and to MLflow and returns its row;
`with_finished` adds the rows of trials an earlier driver finished (resume); `write_summary`
writes `<output_dir>/<sweep>/<run>/summary.json` atomically (`<run>`: the sweep run's folder,
`orchestrator.sweep.run_folder`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from orchestrator.cluster.events import (
    PackOutcome,
    Placement,
)
from orchestrator.cluster.lost import SweepLost
from orchestrator.config.schema import Config
from orchestrator.search.trials import Trial
from orchestrator.tracking.keys import (
    BITS_METRIC,
    DEVICES_TAG,
    EVAL_LOSS,
    MEMORY_ESTIMATE_TAG,
    MEMORY_PEAK_METRIC,
    MEMORY_PEAK_TAG,
    NODE_TAG,
    OOM_SPLITS_TAG,
    PACK_TAG,
    RESTARTS_TAG,
    STATUS_TAG,
    STEPS_TAG,
    STOP_REASON_TAG,
    STOPPED_AT_RUNG_TAG,
    STOPPED_AT_STEP_TAG,
)
from orchestrator.tracking.tracker import Tracker
from qlora import TrialResult, write_adapter
from qlora.config import TrialStatus


def record_trial(trial: Trial, result: TrialResult, outcome: PackOutcome, tracker: Tracker,
                 folder: Path, stop=None, storage_root: str | None = None) -> dict:
    """Save a trial's adapter locally, end its run in MLflow, and return its summary row.

    `stop` (an `orchestrator.search.asha.Stop`) says at which rung and why the search stopped it.
    With a `storage_root` (cluster.storage), the adapter is copied there too
    (`orchestrator.cluster.storage.copy_adapter`) before it goes to the tracker.
    """
    adapter_dir = stored_at = None
    if result.adapter:
        from qlora.checkpoint import StorageUnavailable, patiently

        # The local copy is promised to users; MLflow gets the same files from it. A full disk
        # or a bucket that stops answering is tried again, then stops the sweep resumable.
        key = "output_dir"
        try:
            adapter_dir = patiently(f"adapter of {trial.name} to {folder}", write_adapter,
                                    result.adapter, folder / "adapter")
            if storage_root is not None:
                from orchestrator.cluster.storage import copy_adapter

                key = "cluster.storage"
                stored_at = patiently(f"copy of {trial.name}'s adapter to {storage_root}",
                                      copy_adapter, adapter_dir, storage_root,
                                      tracker.parent_run_id, folder.name)
        except StorageUnavailable as e:
            raise SweepLost(key, str(e)) from e
    placement: Placement | None = outcome.placement
    tags = {PACK_TAG: outcome.pack_id}
    if outcome.memory_estimate is not None:
        tags[MEMORY_ESTIMATE_TAG] = str(outcome.memory_estimate)
    if outcome.memory_peak is not None:
        tags[MEMORY_PEAK_TAG] = str(outcome.memory_peak)
    if placement is not None:
        tags[NODE_TAG] = placement.node_id
        if placement.cuda_visible_devices is not None:
            tags[DEVICES_TAG] = placement.cuda_visible_devices
    if stop is not None and result.status == TrialStatus.STOPPED:
        tags.update({STOPPED_AT_RUNG_TAG: str(stop.rung), STOPPED_AT_STEP_TAG: str(stop.step),
                     STOP_REASON_TAG: stop.reason})
    cost = base_cost(outcome)
    tracker.end_trial(result, adapter_dir, tags, metrics={k: v for k, v in cost.items()
                                                          if v is not None})
    return trial_row(
        trial, status=result.status, steps=result.steps, eval_loss=result.eval_loss,
        eval_metrics={k: v for k, v in (result.eval_metrics or {}).items() if k != EVAL_LOSS},
        samples=list(result.samples or []),
        reason=result.reason, run_id=tracker.run_ids[trial.trial_id], adapter_dir=adapter_dir,
        pack_id=outcome.pack_id, pack_started=outcome.started, pack_ended=outcome.ended,
        placement=asdict(placement) if placement is not None else None,
        stopped_at_rung=stop.rung if stop is not None else None,
        stop_reason=stop.reason if stop is not None else None, dispatched=True,
        trained=result.spec.to_dict() if result.spec is not None else None,
        adapter_storage=stored_at, lineage=list(result.exploits), **cost,
        **counters(tracker, trial.trial_id))


def base_cost(outcome: PackOutcome) -> dict[str, float | None]:
    """What the trial's base cost, as its run's metrics and its row's fields: storage bits per
    weight of the base's linears and the pack's measured peak memory in MiB."""
    peak = outcome.memory_peak
    return {BITS_METRIC: outcome.bits_per_weight,
            MEMORY_PEAK_METRIC: None if peak is None else round(peak / 2**20, 1)}


def trial_row(trial: Trial, *, status, steps: int | None, eval_loss: float | None, run_id: str,
              adapter_dir: Path | None, dispatched: bool, restarts: int, oom_splits: int,
              reason: str | None = None, pack_id: str | None = None,
              pack_started: float | None = None, pack_ended: float | None = None,
              placement: dict | None = None, stopped_at_rung: int | None = None,
              stop_reason: str | None = None, trained: dict | None = None,
              eval_metrics: dict | None = None, samples: list | None = None,
              adapter_storage: str | None = None, base_bits_per_weight: float | None = None,
              memory_peak_mib: float | None = None, lineage: list | None = None) -> dict:
    """The one shape of a trial's row in `summary.json`, whoever ran it.

    `trained` is the engine's spec as the worker trained with it (None for a trial an earlier
    driver finished): what ran, beside what the sweep asked for. `eval_metrics` are the last
    evaluation's scores besides eval_loss; `samples` its generated answers (empty for a trial an
    earlier driver finished: they are in its run's samples/ tables). `adapter_storage` is
    the adapter's copy under `cluster.storage`, if it has one. `quant_type` and `lora_init` are
    the trial's own (a sweep may vary them), beside what its base measured to cost. `lineage`
    lists a PBT trial's exploits (step, source trial, the values it trained on with).
    """
    return {
        "trial_id": trial.trial_id, "name": trial.name, "params": trial.params,
        "lora_r": trial.spec.r, "lora_alpha": trial.spec.alpha,
        "learning_rate": trial.spec.learning_rate,
        "quant_type": trial.base.quant_type, "lora_init": trial.spec.init,
        "base_bits_per_weight": base_bits_per_weight, "memory_peak_mib": memory_peak_mib,
        "status": status, "steps": steps, "eval_loss": eval_loss,
        "eval_metrics": dict(eval_metrics or {}), "samples": list(samples or []),
        "reason": reason,
        "run_id": run_id, "adapter_dir": str(adapter_dir) if adapter_dir is not None else None,
        "adapter_storage": adapter_storage, "pack_id": pack_id, "pack_started": pack_started, "pack_ended": pack_ended,
        "placement": placement, "stopped_at_rung": stopped_at_rung, "stop_reason": stop_reason,
        "dispatched": dispatched, "restarts": restarts, "oom_splits": oom_splits,
        "trained": trained, "lineage": list(lineage or []),
    }


def with_finished(rows: list[dict], trials: list[Trial], finished_runs: dict,
                  out_dir: Path) -> list[dict]:
    """`rows` plus a row for each trial an earlier driver finished (read back from its run),
    in the trials' order."""
    if not finished_runs:
        return rows
    by_id = {r["trial_id"]: r for r in rows}
    folders = folder_names(trials)
    for trial in trials:
        run = finished_runs.get(trial.trial_id)
        if run is None or trial.trial_id in by_id:
            continue
        tags, adapter_dir = run.data.tags, out_dir / folders[trial.trial_id] / "adapter"
        rung = tags.get(STOPPED_AT_RUNG_TAG)
        by_id[trial.trial_id] = trial_row(
            trial, status=TrialStatus(tags.get(STATUS_TAG, TrialStatus.FINISHED)),
            steps=int(tags[STEPS_TAG]) if STEPS_TAG in tags else None,
            eval_loss=run.data.metrics.get(EVAL_LOSS), run_id=run.info.run_id,
            eval_metrics={k: v for k, v in run.data.metrics.items()
                          if k.startswith("eval_") and k != EVAL_LOSS},
            adapter_dir=adapter_dir if adapter_dir.is_dir() else None,
            pack_id=tags.get(PACK_TAG), dispatched=False,
            stopped_at_rung=int(rung) if rung is not None else None,
            stop_reason=tags.get(STOP_REASON_TAG),
            restarts=int(tags.get(RESTARTS_TAG, 0)), oom_splits=int(tags.get(OOM_SPLITS_TAG, 0)),
            base_bits_per_weight=run.data.metrics.get(BITS_METRIC),
            memory_peak_mib=run.data.metrics.get(MEMORY_PEAK_METRIC))
    return [by_id[t.trial_id] for t in trials if t.trial_id in by_id]


def counters(tracker: Tracker, trial_id: str) -> dict[str, int]:
    counts = tracker.counts(trial_id)
    return {"restarts": counts[RESTARTS_TAG], "oom_splits": counts[OOM_SPLITS_TAG]}


def write_summary(path: Path, config: Config, tracker: Tracker, rows: list[dict],
                   exit_code: int, extra: dict | None = None) -> None:
    summary = {
        "sweep": config.sweep.name,
        "exit_code": exit_code,
        "experiment": tracker.experiment_name,
        "tracking_uri": tracker.uri,
        "parent_run_id": tracker.parent_run_id,
        **(extra or {}),
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


def folder_names(trials: list[Trial]) -> dict[str, str]:
    names = [safe_name(t.name or t.trial_id) for t in trials]
    return {t.trial_id: (n if names.count(n) == 1 else f"{n}-{t.trial_id}")
            for t, n in zip(trials, names, strict=True)}


def folder_for(trial: Trial, folders: dict[str, str]) -> str:
    """A folder name for a trial proposed during the sweep, unlike those taken already."""
    name = safe_name(trial.name or trial.trial_id)
    return name if name not in folders.values() else f"{name}-{trial.trial_id}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._") or "sweep"
