"""Resume: MLflow is the sweep's ledger, and a sweep continues in its own runs.

`find_unfinished_sweep` finds the latest parent of the same name that is not FINISHED, and
`resume_sweep` continues it in place: a trial whose child run is FINISHED is done; every other
child is set RUNNING again and logged into (no trial gets a second run; the points it already
holds are not logged twice); trials new to the sweep get a child. A part of `Tracker` (its
`Resuming` base), so every write still goes through the tracker's one client.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from orchestrator.tracking import lease
from orchestrator.tracking.keys import (
    FAILURE_TAG,
    OOM_SPLITS_TAG,
    PARENT_TAG,
    RESTARTS_TAG,
    RESUMES_TAG,
    ROLE_SWEEP,
    ROLE_TAG,
    STATUS_TAG,
    TRIAL_ID_TAG,
    sweep_params,
    trial_params,
)

if TYPE_CHECKING:
    from orchestrator.config.schema import Config
    from orchestrator.search.trials import Trial


class Resuming:
    """`Tracker`'s resume: finding the sweep to continue and reopening its runs."""

    def find_unfinished_sweep(self, name: str):
        """The latest parent run named `name` in the experiment that is not FINISHED, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_SWEEP}' and attributes.run_name = '{name}'",
            order_by=["attributes.start_time DESC"], max_results=1000)
        return next((r for r in runs if r.info.status != "FINISHED"), None)

    def resume_sweep(self, parent, config: Config, trials: list[Trial],
                     extra_params: dict | None = None) -> dict:
        """Continue the sweep of the parent run `parent` with `trials`; returns the FINISHED child
        runs by trial id (their trials are not to run again).

        The parent and every other child of these trials are set RUNNING again; a child of the
        parent that is no trial of this sweep and was left RUNNING by a lost driver ends KILLED.
        """
        self.parent_run_id = parent_id = parent.info.run_id
        self.client.update_run(parent_id, status="RUNNING")
        self._set_tags(parent_id, lease.holder())
        self._beat = time.monotonic()
        self._runs_view()
        self._open.add(parent_id)
        self._forget_end(parent)
        resumes = int(parent.data.tags.get(RESUMES_TAG, "0")) + 1
        self._set_tags(parent_id, {RESUMES_TAG: str(resumes)})
        params = sweep_params(config, len(trials), extra_params)
        self._log_params(parent_id, {k: v for k, v in params.items() if k not in parent.data.params})
        children: dict[str, object] = {}
        others = []
        for run in self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                order_by=["attributes.start_time ASC"], max_results=50000):
            tid = run.data.tags.get(TRIAL_ID_TAG)
            kept = children.get(tid)
            if tid is None or (kept is not None and kept.info.status == "FINISHED"):
                others.append(run)
                continue
            if kept is not None:
                others.append(kept)
            children[tid] = run
        done = {}
        for trial in trials:
            run = children.pop(trial.trial_id, None)
            if run is None:
                self._new_child(trial)
            elif run.info.status == "FINISHED":
                done[trial.trial_id] = run
                self.run_ids[trial.trial_id] = run.info.run_id
            else:
                self._reopen_child(trial, run)
        for run in [*others, *children.values()]:
            if run.info.status == "RUNNING":
                self._set_tags(run.info.run_id, {
                    FAILURE_TAG: "orphaned: its driver was lost and resume=true did not continue it"})
                self.client.set_terminated(run.info.run_id, status="KILLED")
        return done

    # -- helpers --------------------------------------------------------------------------------

    def _reopen_child(self, trial: Trial, run) -> None:
        """Log into an unfinished trial's run again, knowing which points it already holds."""
        run_id, tid = run.info.run_id, trial.trial_id
        self.client.update_run(run_id, status="RUNNING")
        self.run_ids[tid] = run_id
        self._open.add(run_id)
        self._forget_end(run)
        params = trial_params(trial)
        self._log_params(run_id, {k: v for k, v in params.items() if k not in run.data.params})
        for key in run.data.metrics:
            for m in self.client.get_metric_history(run_id, key):
                self._logged.add((tid, key, int(m.step)))
        for tag in (RESTARTS_TAG, OOM_SPLITS_TAG):
            if tag in run.data.tags:
                self._counts[(tid, tag)] = int(run.data.tags[tag])

    def _forget_end(self, run) -> None:
        # The tags of an earlier end would contradict a run that is RUNNING again.
        for tag in (FAILURE_TAG, STATUS_TAG):
            if tag in run.data.tags:
                self.client.delete_tag(run.info.run_id, tag)
