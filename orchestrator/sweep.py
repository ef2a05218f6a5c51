"""`run_sweep(config)`: one sweep from trials to leaderboard.

In the order it runs:

1. **Expand** the sweep into trials (`orchestrator.search.expand`), each with a stable id.
2. **Open the ledger** (`Tracker`): the experiment, the parent run, one child run per trial,
   while Ray starts in a background thread (`cluster.background`). A store that cannot be
   opened is a config error (exit 2); the Ray started meanwhile is shut down again.
3. **Connect** to Ray (the background start's result) and **plan** packs for that many workers.
4. **Dispatch** packs; every poll, streamed metrics go to the tracker (buffered) and the console,
   and each ended pack's trials are recorded: adapter written under
   `<output_dir>/<sweep>/<run>/<trial>/adapter/`, logged as the run's `adapter/` artifacts, run
   ended. `<run>` is this sweep run's own folder (`run_folder`), so a rerun never replaces an
   earlier run's files; `<output_dir>/<sweep>/latest` links to the newest.
5. **Summarise**: leaderboard, `summary.json` beside the adapters, exit status 0 when every trial
   finished (or was stopped by the search) and 1 otherwise.

If anything raises or the user presses Ctrl-C, the tracker ends every open run (FAILED or KILLED)
and the workers are torn down; Ray is shut down only if this sweep started it.

Faults and resume. Each trial checkpoints under `<cluster.checkpoint_dir>/<parent run id>/<trial>/`
every `train.checkpoint_every` steps and when it ends. A lost worker's trials and an out-of-memory
pack's halves go again from there (`orchestrator.cluster.faults`). After a lost driver (or Ctrl-C, which
ends the runs KILLED and prints the command), `resume=true` continues the latest unfinished sweep
of the same name: trials whose runs are FINISHED are not run again, the others continue from their
checkpoints in their own runs. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from mlflow.exceptions import MlflowException

from orchestrator.cluster import storage
from orchestrator.cluster.background import abandon, start_connect
from orchestrator.cluster.connect import disconnect
from orchestrator.cluster.datashare import prepare
from orchestrator.cluster.dispatch import dispatch
from orchestrator.cluster.events import (
    MetricsEvent,
    PackOutcome,
    PackRetried,
    PackStarted,
    TrialEnded,
    WorkersWaiting,
)
from orchestrator.cluster.lost import SweepLost
from orchestrator.config.compose import multirun_job, override_key
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import Config
from orchestrator.console import Console
from orchestrator.finish import finish_sweep
from orchestrator.planner import Pack
from orchestrator.search.expand import expand, first_workers, skipped
from orchestrator.search.objective import Objective
from orchestrator.search.params import normalize
from orchestrator.search.resume_trial import resume_config, resume_path
from orchestrator.search.trials import Trial
from orchestrator.search_run import SearchRun
from orchestrator.summary import (
    folder_for,
    folder_names,
    record_trial,
    safe_name,
    with_finished,
    write_summary,
)
from orchestrator.tracking.keys import (
    CHECKPOINT_DIR_TAG,
    OOM_SPLITS_TAG,
    RESTARTS_TAG,
)
from orchestrator.tracking.lease import live_holder
from orchestrator.tracking.tracker import Tracker
from qlora import checkpoint
from qlora.config import TrialStatus

SUMMARY_FILE = "summary.json"
LATEST_LINK = "latest"  # <output_dir>/<sweep>/latest -> the newest run's folder
INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C
LOST = 3  # the cluster or the tracking server went away (SweepLost): runs KILLED, resumable


def run_sweep(config: Config, cluster: Future | None = None) -> int:
    """Run every trial of `config`'s sweep; 0 if all finished, 1 if any failed, 2 on a bad setup,
    3 when the cluster or the tracking server is gone (`SweepLost`) and 130 when interrupted
    (Ctrl-C); in both, runs end KILLED and the command that resumes is printed.

    Bad setup (store or cluster unreachable) prints one `error:` line naming the key. With
    `resume=true`, the latest unfinished sweep of the same name continues (see the module's
    docstring); if there is none, a note says so and a new sweep starts. `cluster` may be a
    `start_connect(config.cluster)` the caller began already (the CLI does, before importing this).
    """
    cluster = cluster or start_connect(config.cluster, first_workers(config))
    try:
        config = resume_config(normalize(config))  # resume=PATH: that one trial, from its folder
        trials = expand(config)
        # The data tokenized once (by the preflight already, when the CLI ran it: then this
        # opens its cache), uploaded for nodes that share no disk.
        data = prepare(trials, storage.root(config.cluster.storage))
        tracker = _open_tracker(config)
    except BaseException as e:
        abandon(cluster)
        if not isinstance(e, ConfigError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        workers = cluster.result()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(config.output_dir) / safe_name(config.sweep.name)
    try:  # the search's trials (Optuna proposes its first round here) and its coordinator
        search = SearchRun(config, trials, workers, data.rows)
    except BaseException:
        disconnect(workers)
        raise
    trials = search.trials  # the same list: trials the search proposes later are appended
    console = Console(trials)
    for line in skipped(config):
        console.print(f"left out of the sweep: {line}")
    extra = {"num_workers": workers.num_workers, "gpus_per_worker": workers.gpus_per_worker}
    try:
        with _Interrupts():
            try:
                with tracker:
                    previous = _previous_sweep(config, tracker)
                    if previous is None:
                        packs = search.plan(trials)
                        tracker.start_sweep(config, trials, extra_params={
                            **extra, **search.params(), "num_packs": len(packs)})
                        finished_runs = {}
                    else:
                        finished_runs = tracker.resume_sweep(previous, config, trials, extra)
                        packs = search.plan([t for t in trials
                                             if t.trial_id not in finished_runs])
                        console.print(f"resuming sweep {config.sweep.name} (parent run "
                                      f"{tracker.parent_run_id}): {len(finished_runs)} of "
                                      f"{len(trials)} trials already finished")
                    checkpoints = _checkpoint_root(config, out_dir, previous, tracker)
                    run_dir = open_run_dir(out_dir, tracker)
                    rows = _run(packs, workers, trials, tracker, console, run_dir,
                                search=search, checkpoint_dir=checkpoints,
                                storage_root=storage.root(config.cluster.storage), data=data,
                                checkpoint_every=config.train.checkpoint_every,
                                max_retries=config.cluster.max_retries,
                                lost_timeout_s=config.cluster.lost_timeout_s,
                                hang_timeout_s=config.cluster.hang_timeout_s)
                    rows = with_finished(rows, trials, finished_runs, run_dir)
                    done = {r["trial_id"] for r in rows}
                    failed = [r["trial_id"] for r in rows if not TrialStatus(r["status"]).succeeded]
                    failed += [t.trial_id for t in trials if t.trial_id not in done]  # never reported
                    finished = finish_sweep(config, tracker, rows, trials, run_dir)
                    tracker.end_sweep(failed)
            finally:
                console.close()
                search.close()
                disconnect(workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted: runs marked KILLED; finished trials are kept and the others "
              f"continue from their last checkpoints with:\n  {_resume_command(config)}",
              file=sys.stderr, flush=True)
        return INTERRUPTED
    except SweepLost as e:
        runs = ("its runs stay RUNNING on that server" if e.key == "tracking.uri"
                else "runs marked KILLED")
        print(f"error: {e.key}: {e.reason}\nthe sweep stopped: {runs}; finished trials are kept "
              f"and the others continue from their last checkpoints with:\n"
              f"  {_resume_command(config)}", file=sys.stderr, flush=True)
        return LOST
    console.summary(config.sweep.name, rows, adapters_dir=str(run_dir),
                    parent_run_id=tracker.parent_run_id, tracking_uri=tracker.uri,
                    experiment=tracker.experiment_name, objective=Objective.of(config),
                    experiment_id=tracker.experiment_id)
    for line in finished.lines:  # the search's figures, the registered adapter, the report
        console.print(line)
    exit_code = 1 if failed else 0
    write_summary(run_dir / SUMMARY_FILE, config, tracker, rows, exit_code, extra={
        "resumed": previous is not None,
        "trials_dispatched": sum(len(p.trials) for p in packs),
        "trials_already_finished": len(finished_runs),
        "checkpoint_dir": checkpoints,
        "run_dir": str(run_dir),
        "search": finished.summary,
    })
    # A FINISHED sweep cannot be resumed: its checkpoints serve no one; a folder given with
    # resume=PATH is the user's and is kept.
    if exit_code == 0 and resume_path(config) is None:
        checkpoint.remove(checkpoints)
    return exit_code


def _previous_sweep(config: Config, tracker: Tracker):
    """The parent run that `resume=true` continues, or None (a new sweep starts)."""
    if config.resume is not True:  # false, or a trial folder (a new sweep of that trial)
        return None
    previous = tracker.find_unfinished_sweep(config.sweep.name)
    if previous is not None and (held := live_holder(previous)):
        raise ConfigError("resume", f"sweep {config.sweep.name!r} (parent run "
                                    f"{previous.info.run_id}) is running ({held}); wait for it "
                                    "to end, or stop it (Ctrl-C) and resume then")
    if previous is None:
        print(f"note: resume=true: no unfinished sweep named {config.sweep.name!r} in experiment "
              f"{tracker.experiment_name!r}; starting a new one", file=sys.stderr)
    return previous


def _checkpoint_root(config: Config, out_dir: Path, previous, tracker: Tracker) -> str:
    """`<checkpoints>/<parent run id>`: one folder per sweep run, so a new sweep of the same name
    never continues from an older one's checkpoints; a resumed sweep reuses its own.
    `<checkpoints>` is `<cluster.storage>/checkpoints` (a folder or a URI), else
    `cluster.checkpoint_dir`, else `<output_dir>/<sweep>/checkpoints`.

    Derived from the config and the run id alone, never from the parent's `qlora.checkpoint_dir`
    tag: a tag is data anyone who can write to the store sets, and a finished sweep deletes its
    checkpoint root. A tag that names another folder is reported, not followed."""
    recorded = previous.data.tags.get(CHECKPOINT_DIR_TAG) if previous is not None else None
    cluster = config.cluster
    if resume_path(config) is not None:
        root = str(resume_path(config).parent)  # the trial continues in the folder it was given
    elif cluster.storage is not None:
        root = storage.join(storage.root(cluster.storage), "checkpoints", tracker.parent_run_id)
    else:
        base = Path(cluster.checkpoint_dir or out_dir / "checkpoints").expanduser()
        root = str(base.resolve() / tracker.parent_run_id)  # workers do not share the driver's cwd
    if recorded and recorded != root and resume_path(config) is None:
        print(f"note: the sweep's tag {CHECKPOINT_DIR_TAG} names {recorded}; its checkpoints are "
              f"taken from {root}, derived from the config (a tag never picks a folder)",
              file=sys.stderr)
    tracker.set_sweep_tags({CHECKPOINT_DIR_TAG: root})
    return root


def run_folder(parent_run_id: str, start_time_ms: int) -> str:
    """A sweep run's folder name: its parent run's start (UTC) and id, `20261203-041502-3cb1a393`;
    sortable, and the same for a resumed sweep (same parent run)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(start_time_ms / 1000))
    return f"{stamp}-{parent_run_id[:8]}"


def open_run_dir(out_dir: Path, tracker: Tracker) -> Path:
    """Create this sweep run's folder under `out_dir` and point `out_dir/latest` at it."""
    parent = tracker.client.get_run(tracker.parent_run_id)
    run_dir = out_dir / run_folder(parent.info.run_id, parent.info.start_time)
    run_dir.mkdir(parents=True, exist_ok=True)
    link = out_dir / LATEST_LINK
    tmp = out_dir / f".{LATEST_LINK}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        tmp.replace(link)  # atomic: readers see the old run or the new one, never no link
    except OSError:  # a filesystem without symlinks: the folders are all there, only no link
        with contextlib.suppress(OSError):
            tmp.unlink()
    return run_dir


def _resume_command(config: Config) -> str:
    """The command line that continues this sweep: the user's overrides plus `resume=true`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # not under Hydra (a library call): the sweep's name is what resume needs
        overrides = [f"sweep={config.sweep.name}"]
    multirun = multirun_job() is not None  # a -m job's sweep has a name of its own: resume it
    dropped = ("resume", "sweep.name") if multirun else ("resume",)
    overrides = [o for o in overrides if override_key(o) not in dropped]
    if multirun:
        overrides.append(f"sweep.name={config.sweep.name}")
    return " ".join(["python -m orchestrator", *map(shlex.quote, overrides), "resume=true"])


class _Interrupts:
    """Ctrl-C: the first raises KeyboardInterrupt (the sweep stops cleanly), a second exits now."""

    def __enter__(self) -> _Interrupts:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._first)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _first(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, self._second)
        raise KeyboardInterrupt

    @staticmethod
    def _second(signum, frame) -> None:
        print("\nsecond interrupt: exiting now; runs still RUNNING are continued by resume=true",
              file=sys.stderr, flush=True)
        os._exit(INTERRUPTED)


def _open_tracker(config: Config) -> Tracker:
    try:
        return Tracker(config.tracking)
    except (MlflowException, OSError) as e:
        raise ConfigError("tracking.uri", f"cannot open {config.tracking.uri}: {e}") from e


def _run(packs: list[Pack], workers, trials: list[Trial], tracker: Tracker, console: Console,
         out_dir: Path, search: SearchRun, storage_root: str | None = None,
         **faults) -> list[dict]:
    """Dispatch the packs and record every trial as its pack ends; returns the summary rows.

    `faults` are `dispatch`'s checkpoint_dir, checkpoint_every, max_retries, lost_timeout_s,
    hang_timeout_s and data (the driver's tokenized data, `orchestrator.cluster.datashare`).
    The `search` may stop trials early, backfill slots, exploit and add trials as the sweep goes.
    With a `storage_root`, each adapter is also copied there (orchestrator.cluster.storage).
    """
    by_id = {t.trial_id: t for t in trials}
    folders = folder_names(trials)
    pack_trials = {p.pack_id: [t.trial_id for t in p.trials] for p in packs}
    announced: set[str] = set()  # trials whose end the console has shown
    rows: dict[str, dict] = {}
    options = search.dispatch_options()
    with contextlib.closing(dispatch(packs, workers, **faults, **options)) as batches, \
            checkpoint.patience(faults.get("lost_timeout_s")):  # the driver's writes of adapters
        for events in batches:
            new_trials, new_packs = search.take_new()  # known before their events
            for trial in new_trials:
                by_id[trial.trial_id] = trial
                folders[trial.trial_id] = folder_for(trial, folders)
                tracker.add_trial(trial)
                console.add_trial(trial)
            pack_trials.update(new_packs)
            for ev in events:
                if isinstance(ev, MetricsEvent):
                    tracker.log_metrics(ev.trial_id, ev.step, ev.metrics, ev.time)
                    console.metrics(ev.trial_id, ev.step, ev.metrics)
                    search.on_metrics(ev.trial_id, ev.step, ev.metrics, ev.pack_id)
                elif isinstance(ev, PackStarted):
                    console.pack_started(ev.pack_id, pack_trials[ev.pack_id], ev.placement)
                elif isinstance(ev, TrialEnded):
                    search.on_trial_end(ev.trial_id)
                    if ev.trial_id not in announced:  # a retried pack reports a trial again
                        announced.add(ev.trial_id)
                        stop = (search.stop_of(ev.trial_id)
                                if ev.status == TrialStatus.STOPPED else None)
                        console.trial_ended(ev.trial_id, ev.status, ev.steps, ev.eval_loss,
                                            stop.reason if stop is not None else ev.reason)
                elif isinstance(ev, WorkersWaiting):
                    console.workers_waiting(ev.waiting, ev.total, ev.asks, ev.since, ev.cluster)
                elif isinstance(ev, PackRetried):
                    pack_trials[ev.pack_id] = ev.trial_ids
                    tag = RESTARTS_TAG if ev.cause == "worker_lost" else OOM_SPLITS_TAG
                    for tid in ev.trial_ids:
                        tracker.count(tid, tag)
                    why = "worker lost" if ev.cause == "worker_lost" else "out of memory, split"
                    console.print(f"{ev.from_pack}: {why} ({ev.reason}); "
                                  f"{len(ev.trial_ids)} trial(s) go again from their checkpoints "
                                  f"as {ev.pack_id}")
                elif isinstance(ev, PackOutcome):
                    search.on_outcome(ev, faults.get("max_retries", 0))
                    for result in ev.results:
                        if result.trial_id not in announced:
                            console.trial_ended(result.trial_id, result.status, result.steps,
                                                result.eval_loss, result.reason)
                        trial = by_id[result.trial_id]
                        stop = search.stop_of(trial.trial_id)
                        rows[trial.trial_id] = record_trial(
                            trial, result, ev, tracker, out_dir / folders[trial.trial_id], stop,
                            storage_root)
            search.watch()
            tracker.flush()
    return [rows[t.trial_id] for t in trials if t.trial_id in rows]
