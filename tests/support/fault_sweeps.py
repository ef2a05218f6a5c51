"""What the fault tests share: one CLI sweep (`OVERRIDES`) run as a user runs it (`Cli`), and what
a tracking store holds about it (`Ledger`), compared with the same sweep run once without faults."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.tracking.keys import EVAL_LOSS, ROLE_TAG, TRAIN_LOSS, TRIAL_ID_TAG

REPO = Path(__file__).resolve().parents[2]
REL = 1e-4


@dataclass
class Ledger:
    """What one tracking store holds about one sweep name: its parents and each trial's runs."""

    parents: list  # mlflow Runs
    runs: dict  # trial_id -> list of mlflow Runs
    curves: dict  # trial_id -> {metric: [(step, value)]}, of the trial's last run


def ledger_of(uri: str, experiment: str = "qlora-sweeps") -> Ledger:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    parents, runs, curves = [], {}, {}
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        if run.data.tags.get(ROLE_TAG) == "sweep":
            parents.append(run)
        else:
            runs.setdefault(run.data.tags[TRIAL_ID_TAG], []).append(run)
    for tid, found in runs.items():
        curves[tid] = {key: sorted((m.step, m.value) for m in
                                   client.get_metric_history(found[-1].info.run_id, key))
                       for key in (TRAIN_LOSS, EVAL_LOSS)}
    return Ledger(parents, runs, curves)


def by_name(ledger: Ledger) -> Ledger:
    """The ledger with trials keyed by their run names: a sweep whose data lies elsewhere (its
    `data.path`, hence its trial ids, differ) compared with the reference, trial by trial."""
    names = {tid: runs[0].info.run_name for tid, runs in ledger.runs.items()}
    return Ledger(ledger.parents, {names[t]: r for t, r in ledger.runs.items()},
                  {names[t]: c for t, c in ledger.curves.items()})


def same_curve(mine: list, theirs: list, what: str) -> None:
    assert [s for s, _ in mine] == [s for s, _ in theirs], what  # also: no step twice
    for (_, a), (_, b) in zip(mine, theirs, strict=True):
        # Within 1e-4 both ways: relative, and absolute (losses here are 3 to 6).
        assert math.isclose(a, b, rel_tol=REL, abs_tol=0) and abs(a - b) <= REL, (
            what, mine, theirs)


SWEEP = "faults"
OVERRIDES = ["sweep=single", f"sweep.name={SWEEP}",
             "++sweep.params={lora.r: [4, 8], train.learning_rate: [1e-3, 2e-3]}",
             "train.max_steps=16", "train.seq_len=64", "train.micro_batch_size=2",
             "data.max_eval_examples=16", "train.eval_every=8", "train.checkpoint_every=4",
             "seed=5", "eval.num_samples=2"]
STEPS = 16


class Cli:
    """`python -m orchestrator` in a folder of its own, with its own local Ray."""

    def __init__(self, cwd: Path, *extra: str, env: dict | None = None):
        """`env` is added to this process's environment (less its RAY_ variables)."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **(env or {})}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.cwd = cwd
        self.log = open(cwd / f"cli-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *OVERRIDES, *extra],
                                     cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.family: dict = {}  # pid -> psutil.Process of its Ray processes, seen while it ran

    def wait_for(self, what, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            assert self.proc.poll() is None, f"the sweep ended first:\n{self.output()}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output()}"
            self._note_family()
            time.sleep(0.1)
        self._note_family()

    def pack_workers(self) -> list:
        import psutil

        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.cmdline()[0].startswith("ray::PackWorker"):
                    found.append(child)
            except (psutil.Error, IndexError):
                pass
        return found

    def listening(self) -> list[tuple[str, str]]:
        """(process name, address) of every socket the CLI and its processes listen on now."""
        import psutil

        self._note_family()
        found = []
        for process in [psutil.Process(self.proc.pid), *self.family.values()]:
            try:
                name = process.name()
                found += [(name, c.laddr.ip) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
            except psutil.Error:  # ended meanwhile
                pass
        return found

    def finish(self, timeout: float = 240.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.cleanup()

    def output(self, tail: int | None = 6000) -> str:
        """What the CLI printed: its last `tail` characters, or all of it (None)."""
        self.log.flush()
        self.log.seek(0)
        text = self.log.read()
        return text[-tail:] if tail else text

    def cleanup(self) -> None:
        """End what this test started and left behind: the CLI and its Ray processes, by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        import psutil

        for process in self.family.values():
            try:
                process.kill()  # psutil checks that the pid was not reused meanwhile
            except psutil.Error:
                pass

    def _note_family(self) -> None:
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.family.setdefault(child.pid, child)
        except psutil.Error:
            pass


def checkpointed(cwd: Path):
    return lambda: any((cwd / "outputs" / SWEEP / "checkpoints").glob("*/*/latest"))


def summary_of(cwd: Path) -> dict:
    import json

    return json.loads((cwd / "outputs" / SWEEP / "latest" / "summary.json").read_text())


def matches_reference(ledger: Ledger, reference: Ledger) -> None:
    assert set(ledger.runs) == set(reference.runs)
    for tid, runs in ledger.runs.items():
        assert [r.info.status for r in runs] == ["FINISHED"], tid  # every trial once, finished
        train = ledger.curves[tid][TRAIN_LOSS]
        assert [s for s, _ in train] == list(range(1, STEPS + 1)), tid
        for key in (TRAIN_LOSS, EVAL_LOSS):
            same_curve(ledger.curves[tid][key], reference.curves[tid][key], (tid, key))


