"""`Tracker`: the sweep's only writer to MLflow (its key names: `orchestrator.tracking.keys`).

Layout (promised to users in README.md, "What you get"): one experiment; one parent run per
sweep (run name = sweep name, tag `qlora.role=sweep`, the sweep definition as params); one child run per trial (tags
`mlflow.parentRunId`, `qlora.role=trial`, `qlora.trial_id`; every setting as a param; metrics
`train_loss` per step, `eval_loss`, `eval_exact_match`, `eval_token_f1` (and a user metric) per
evaluation; a table of the generated samples per evaluation under `samples/step_NNNNNN.json`,
which the UI's artifact view shows as a table; the adapter under `adapter/`).

Only the driver writes, and metrics are buffered and sent with `log_batch` at most about once a
second: one writer keeps SQLite free of lock errors and keeps Ray workers free of MLflow (a run
opened in another process would also land in the Default experiment unless told otherwise).

Statuses. A child ends FINISHED when its trial finished or was stopped early by the search, and
FAILED (tag `qlora.failure` says why) when it diverged or failed. The parent mirrors the exit
code: FINISHED when every trial finished, FAILED (with `qlora.failure` counting the failed
trials) otherwise, so the runs list flags a sweep that needs a look. If the driver itself raises,
`Tracker` as a context manager ends every run still RUNNING: KILLED for Ctrl-C and for a lost
cluster or server (`SweepLost`, resumable), else FAILED.

Resume: `orchestrator.tracking.resume` (a part of `Tracker`). Counters on a child:
`qlora.restarts` (sent again after a lost worker), `qlora.oom_splits`.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from orchestrator.cluster.lost import SweepLost
from orchestrator.config.schema import Config, TrackingCfg
from orchestrator.tracking import lease
from orchestrator.tracking.keys import (
    ADAPTER_DIR,
    BATCH_METRICS,
    BATCH_PARAMS,
    DATA_TAG_PREFIX,
    EVAL_LOSS,
    EXPERIMENT_KIND_TAG,
    FAILURE_TAG,
    FLUSH_INTERVAL_S,
    HEARTBEAT_S,
    LINEAGE_TAG,
    OOM_SPLITS_TAG,
    PARENT_TAG,
    RESTARTS_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    ROLE_TRIAL,
    RUN_NAME_TAG,
    RUNS_VIEW_COLUMNS,
    RUNS_VIEW_ORDER,
    RUNS_VIEW_TAG,
    STATUS_TAG,
    STEPS_TAG,
    TRAIN_LOSS,
    TRIAL_ID_TAG,
    TRIAL_SEED_TAG,
    _truncate,
    base_tags,
    is_local_store,
    lineage_text,
    samples_file,
    sweep_params,
    trial_params,
)
from orchestrator.tracking.patient import PatientClient
from orchestrator.tracking.resume import Resuming
from qlora.config import TrialStatus
from qlora.exploit import EXPLOIT
from qlora.metrics import SAMPLES

if TYPE_CHECKING:
    from orchestrator.search.trials import Trial
    from qlora import TrialResult


class Tracker(Resuming):
    """Writes one sweep to MLflow from the driver. Use as a context manager."""

    def __init__(self, tracking: TrackingCfg):
        """Connect to `tracking.uri` and get or create `tracking.experiment`."""
        self.uri = tracking.uri
        # "Creating initial MLflow database tables..." on every new store: nothing to act on
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self._direct = MlflowClient(tracking_uri=tracking.uri)
        self.client = PatientClient(self._direct, tracking.uri, tracking.lost_timeout_s,
                                    server=not is_local_store(tracking.uri))
        self.experiment_name = tracking.experiment
        self.experiment_id = self._experiment(tracking)
        self.parent_run_id: str | None = None
        self.run_ids: dict[str, str] = {}  # trial_id -> child run id
        self._open: set[str] = set()  # runs not yet terminated
        self._buffer: dict[str, list[Metric]] = {}
        self._last_flush = 0.0
        self._beat = 0.0  # when the parent's heartbeat was last renewed (monotonic)
        self._logged: set[tuple[str, str, int]] = set()  # (trial_id, key, step) already buffered
        self._counts: dict[tuple[str, str], int] = {}  # (trial_id, counter tag) -> value
        self._lineage: dict[str, list[dict]] = {}  # trial_id -> its exploits streamed (PBT)

    # -- lifecycle ------------------------------------------------------------------------------

    def start_sweep(self, config: Config, trials: list[Trial], extra_params: dict | None = None):
        """Create the parent run and one RUNNING child per trial; returns the parent run id."""
        parent = self.client.create_run(self.experiment_id, run_name=config.sweep.name,
                                        tags={ROLE_TAG: ROLE_SWEEP})
        self.parent_run_id = parent.info.run_id
        self._open.add(self.parent_run_id)
        self._set_tags(self.parent_run_id, lease.holder())
        self._beat = time.monotonic()
        self._log_params(self.parent_run_id, sweep_params(config, len(trials), extra_params))
        for trial in trials:
            self._new_child(trial)
        self._runs_view()
        return self.parent_run_id

    def _runs_view(self) -> None:
        """Point the experiment's runs view (`RUNS_VIEW_TAG`) at this sweep's trials."""
        view = {"selectedColumns": list(RUNS_VIEW_COLUMNS),
                "orderByKey": RUNS_VIEW_ORDER, "orderByAsc": True,
                "runsExpanded": {self.parent_run_id: True}}
        self.client.set_experiment_tag(self.experiment_id, RUNS_VIEW_TAG, json.dumps(view))

    def add_trial(self, trial: Trial) -> None:
        """A RUNNING child run for a trial proposed after the sweep started (Optuna's rounds)."""
        self._new_child(trial)

    def count(self, trial_id: str, tag: str) -> int:
        """Add one to a trial's counter tag (`RESTARTS_TAG`, `OOM_SPLITS_TAG`), shown at once."""
        value = self._counts.get((trial_id, tag), 0) + 1
        self._counts[(trial_id, tag)] = value
        self.client.later(functools.partial(self._set_tags, self.run_ids[trial_id],
                                            {tag: str(value)}))
        return value

    def counts(self, trial_id: str) -> dict[str, int]:
        """A trial's counters, those of earlier drivers of a resumed sweep included."""
        return {tag: self._counts.get((trial_id, tag), 0) for tag in (RESTARTS_TAG, OOM_SPLITS_TAG)}

    def set_sweep_tags(self, tags: dict[str, str]) -> None:
        """Tags on the parent run."""
        self._set_tags(self.parent_run_id, tags)

    def log_sweep_metrics(self, metrics: dict[str, float]) -> None:
        """Metrics on the parent run (the search's figures), at step 0."""
        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[
            Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def log_sweep_files(self, paths: list[Path], folder: str) -> None:
        """Files attached to the parent run under `folder` (the report's figures)."""
        for path in paths:
            self.client.log_artifact(self.parent_run_id, str(path), folder)

    def register(self, name: str, row: dict, *, sweep: str, objective=None):
        """Register the summary row `row` as `models:/name@champion`; the model version."""
        from orchestrator.tracking.registry import register_best

        return register_best(self.client, name, row, sweep=sweep,
                             parent_run_id=self.parent_run_id, objective=objective)

    def log_metrics(self, trial_id: str, step: int, metrics: dict[str, float],
                    timestamp: float | None = None) -> None:
        """Buffer a trial's metrics at `step` (sent by `flush`).

        A key already logged at that step is skipped: a trial that continues from a checkpoint
        reports its steps after the checkpoint again, with the same values. Generated samples
        (`qlora.generate.SAMPLES`) are logged at once as that step's table.
        """
        run_id = self.run_ids[trial_id]
        ms = int((timestamp or time.time()) * 1000)
        buf = self._buffer.setdefault(run_id, [])
        for key, value in metrics.items():
            if (trial_id, key, int(step)) in self._logged:
                continue
            if key == SAMPLES:
                self.client.later(functools.partial(self.log_samples, trial_id, step, value))
                continue
            if key == EXPLOIT:  # PBT: this trial took another's state (the lineage tag)
                self._lineage.setdefault(trial_id, []).append(value)
                self.client.later(functools.partial(self._set_tags, run_id, {
                    LINEAGE_TAG: lineage_text(self._lineage[trial_id])}))
                continue
            buf.append(Metric(key=key, value=float(value), timestamp=ms, step=int(step)))
            self._logged.add((trial_id, key, int(step)))

    def log_samples(self, trial_id: str, step: int, samples: list[dict]) -> None:
        """A trial's generated samples at `step` as an MLflow table (`samples/step_NNNNNN.json`):
        one row per prompt with its reference, prediction and per-row scores."""
        if (trial_id, SAMPLES, int(step)) in self._logged or not samples:
            return
        columns = list(dict.fromkeys(k for row in samples for k in row))
        data = {c: [row.get(c) for row in samples] for c in columns}
        self.client.log_table(self.run_ids[trial_id], data=data,
                              artifact_file=samples_file(step))
        self._logged.add((trial_id, SAMPLES, int(step)))

    def flush(self, force: bool = False) -> None:
        """Send buffered metrics, at most once per `FLUSH_INTERVAL_S` unless `force` (kept, with
        the other writes, while a tracking server does not answer: `PatientClient.later`)."""
        now = time.monotonic()
        if not force and now - self._last_flush < FLUSH_INTERVAL_S:
            return
        self._last_flush = now
        self.client.later(self._send_buffer, key="metrics")
        if self.parent_run_id is not None and now - self._beat >= HEARTBEAT_S:
            self._beat = now  # the sweep's lease, renewed (orchestrator.tracking.lease)
            self.client.later(functools.partial(self._set_tags, self.parent_run_id,
                                                lease.heartbeat()), key="heartbeat")

    def _send_buffer(self) -> None:
        """A batch leaves the buffer only once the store took it."""
        for run_id, metrics in self._buffer.items():
            while metrics:
                self.client.log_batch(run_id, metrics=metrics[:BATCH_METRICS])
                del metrics[:BATCH_METRICS]
        self._buffer = {}

    def end_trial(self, result: TrialResult, adapter_dir: Path | None = None,
                  tags: dict[str, str] | None = None, metrics: dict | None = None) -> None:
        """Log what the stream missed, `metrics` (at its last step), the adapter folder (if
        any), then end the child run. Points the stream delivered are not logged twice; the
        final eval_loss is always present. While a tracking server does not answer, this is
        kept and done when it does."""
        self.client.later(functools.partial(self._end_trial, result, adapter_dir, tags, metrics))

    def _end_trial(self, result: TrialResult, adapter_dir: Path | None,
                   tags: dict[str, str] | None, metrics: dict | None = None) -> None:
        trial_id, run_id = result.trial_id, self.run_ids[result.trial_id]
        for step, loss in enumerate(result.train_losses, 1):
            self.log_metrics(trial_id, step, {TRAIN_LOSS: loss})
        history = list(result.eval_history)
        if result.eval_loss is not None:
            history.append((result.steps, result.eval_loss))
        for step, loss in history:
            self.log_metrics(trial_id, step, {EVAL_LOSS: loss})
        final = {k: v for k, v in (result.eval_metrics or {}).items() if k != EVAL_LOSS}
        if final:  # the last evaluation's scores (and samples), should the stream have missed them
            self.log_metrics(trial_id, result.steps, final)
        self.log_metrics(trial_id, result.steps, metrics or {})
        self.log_samples(trial_id, result.steps, list(result.samples or []))
        self._send_buffer()
        if adapter_dir is not None:
            self.client.log_artifacts(run_id, str(adapter_dir), ADAPTER_DIR)
        run_tags = {STATUS_TAG: result.status, STEPS_TAG: result.steps, **(tags or {})}
        if result.exploits:  # every exploit, those before a resume included (from the checkpoint)
            run_tags[LINEAGE_TAG] = lineage_text(result.exploits)
        run_tags.update({DATA_TAG_PREFIX + k: str(v) for k, v in (result.data or {}).items()
                         if v is not None})
        if not TrialStatus(result.status).succeeded:
            run_tags[FAILURE_TAG] = result.reason or result.status
        self._set_tags(run_id, run_tags)
        self._terminate(run_id, "FINISHED" if TrialStatus(result.status).succeeded else "FAILED")

    def end_sweep(self, failed: list[str]) -> None:
        """End every child left open as FAILED, then the parent (FAILED if any trial failed)."""
        self.flush(force=True)
        self.client.catch_up(wait=True)  # the trials' ends first
        for trial_id, run_id in self.run_ids.items():
            if run_id in self._open:
                failed = [*failed, trial_id]
                self._set_tags(run_id, {FAILURE_TAG: "the sweep ended without a result for it"})
                self._terminate(run_id, "FAILED")
        if self.parent_run_id is None:
            return
        if failed:
            self._set_tags(self.parent_run_id, {
                FAILURE_TAG: f"{len(failed)} of {len(self.run_ids)} trials failed"})
        self._terminate(self.parent_run_id, "FAILED" if failed else "FINISHED")

    def abort(self, error: BaseException) -> None:
        """End every open run: KILLED on Ctrl-C, else FAILED, tagged with the driver's error."""
        if isinstance(error, KeyboardInterrupt):
            status, why = "KILLED", "interrupted"
        elif isinstance(error, SweepLost):
            status, why = "KILLED", f"sweep lost: {error.reason}"
        else:
            status, why = "FAILED", f"driver error: {type(error).__name__}: {error}"
        if isinstance(error, SweepLost) and error.key == "tracking.uri":
            return  # the server is gone: resume=true ends or continues these runs later
        try:
            self.client.catch_up()  # what was kept, if the server answers
        except Exception:
            pass
        self.client = self._direct  # one try each: the runs' status, not a wait, matters now
        try:
            self._send_buffer()
        except Exception:
            pass  # the runs' status matters more than their last second of metrics
        for run_id in [*self._open]:
            try:
                self._set_tags(run_id, {FAILURE_TAG: why})
                self._terminate(run_id, status)
            except Exception:
                pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abort(exc)

    # -- helpers --------------------------------------------------------------------------------

    def _new_child(self, trial: Trial) -> None:
        run = self.client.create_run(self.experiment_id, tags={
            PARENT_TAG: self.parent_run_id, ROLE_TAG: ROLE_TRIAL,
            TRIAL_ID_TAG: trial.trial_id, TRIAL_SEED_TAG: str(trial.spec.seed),
            RUN_NAME_TAG: trial.name, **base_tags(trial.config.model.name_or_path),
        })
        run_id = run.info.run_id
        self.run_ids[trial.trial_id] = run_id
        self._open.add(run_id)
        self._log_params(run_id, trial_params(trial))

    def _experiment(self, tracking: TrackingCfg) -> str:
        exp = self.client.get_experiment_by_name(tracking.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        location = None
        if is_local_store(tracking.uri):
            # Without this a SQLite store puts artifacts under ./mlruns, wherever the UI expects.
            location = Path(tracking.artifact_location).resolve().as_uri()
        try:
            return self.client.create_experiment(
                tracking.experiment, artifact_location=location,
                # MLflow 3's UI opens an experiment in its GenAI view unless told it holds
                # training runs; this tag makes it open on the runs table and loss charts.
                tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        except MlflowException:
            exp = self.client.get_experiment_by_name(tracking.experiment)  # created meanwhile
            if exp is None:
                raise
            return exp.experiment_id

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), BATCH_PARAMS):
            self.client.log_batch(run_id, params=items[i:i + BATCH_PARAMS])

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        items = [RunTag(k, _truncate(str(v))) for k, v in tags.items()]
        self.client.log_batch(run_id, tags=items)

    def _terminate(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)
        self._open.discard(run_id)
