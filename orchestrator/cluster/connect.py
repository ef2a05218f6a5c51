"""Connecting to Ray: start it here (`local`) or join a cluster, and decide how many workers.

`connect(cluster)` starts Ray here or joins one (`auto`, `ray://...`), or reuses a Ray already
initialised in this process (tests, notebooks), and resolves `num_workers` and `gpus_per_worker`
from the cluster's resources. `worker_env` is what every worker process runs with.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray

from orchestrator.cluster.events import first_line
from orchestrator.config.errors import ConfigError
from orchestrator.config.schema import ClusterCfg

log = logging.getLogger(__name__)
_CODE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding orchestrator/, qlora/

#: Every worker trains with one thread: two 2-thread processes on two cores run ~50x slower.
#: Progress bars of model loading would interleave with the driver's own progress display.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
              "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
MAX_CPU_WORKERS = 8


class ClusterUnavailable(ConfigError):
    """Ray could not be started or reached, or cannot host the requested workers (exit 2)."""


@dataclass
class WorkerPlan:
    """How many workers a sweep runs and what each one asks Ray for."""

    num_workers: int
    gpus_per_worker: float
    address: str
    owns_ray: bool  # connect() called ray.init, so disconnect() shuts it down
    resources: dict[str, float] = field(default_factory=dict)
    # workers created as soon as Ray is up (orchestrator.cluster.dispatch.prestart), so that
    # their imports overlap the driver's setup; taken by `dispatch`, else killed by disconnect
    prestarted: object | None = None


#: Warnings Ray prints on every local start that ask nothing of the user: token auth turned on
#: by a token file (a Ray this sweep starts and ends itself), and the driver's Ray starting in
#: the background thread (orchestrator.cluster.background), where no SIGTERM handler can be set.
_LOCAL_NOISE = {
    "ray._private.authentication.authentication_token_setup": "Token authentication is enabled",
    "ray._private.worker": "SIGTERM handler is not set",
}


class _DropStarting(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.text)


def _quiet_local_start() -> None:
    """Hide `_LOCAL_NOISE` (each logger's own filter: every other warning still shows)."""
    for name, text in _LOCAL_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStarting) for f in logger.filters):
            logger.addFilter(_DropStarting(text))


def auth_hint(error: BaseException) -> str:
    """What to do when Ray refused this process's token (Ray 2.60 turns token auth on for a head
    started where ~/.ray/auth_token exists; every process of that cluster must then agree)."""
    text = f"{type(error).__name__} {error}"
    if "InvalidAuthToken" not in text and "auth token" not in text.lower():
        return ""
    return ("; the cluster uses token auth: run with RAY_AUTH_MODE=token and the head's token "
            "(~/.ray/auth_token, or RAY_AUTH_TOKEN), as every node of it does")


def connect(cluster: ClusterCfg) -> WorkerPlan:
    """Start, join or reuse Ray and resolve `num_workers` and `gpus_per_worker`.

    A Ray already initialised in this process is reused as it is (and left running afterwards).
    `local` starts Ray on this machine; `auto` ($RAY_ADDRESS, else the last `ray start`), a head's
    `HOST:PORT` and `ray://HOST:PORT` join an existing cluster.
    `gpus_per_worker` None means 1 on a cluster with GPUs, else 0. `num_workers` None means one
    worker per `gpus_per_worker` GPUs, or on a CPU-only cluster one per CPU (1 to 8).
    Raises `ClusterUnavailable` (a `ConfigError`) with a one-line reason naming the key at fault.
    """
    owns = False
    if not ray.is_initialized():
        kwargs = dict(logging_level=logging.WARNING, configure_logging=True)
        if cluster.address == "local":
            _quiet_local_start()
        try:
            if cluster.address != "local":
                _outlive_the_head(cluster.lost_timeout_s)
            if cluster.address == "local":
                # "local", not None: ray.init() alone joins the cluster named in
                # /tmp/ray/ray_current_cluster (another user's, a test's) when there is one.
                ray.init(address="local", include_dashboard=False, **kwargs)
            else:
                ray.init(address=cluster.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterUnavailable(
                "cluster.address", f"cannot start or reach Ray at {cluster.address!r}: "
                f"{first_line(e)}{auth_hint(e)}") from e
        owns = True
        if cluster.address == "local":
            _warn_unless_loopback()
    try:
        resources = {k: float(v) for k, v in ray.cluster_resources().items()}
        num_workers, gpus = _resolve_workers(cluster, resources)
    except ClusterUnavailable:
        if owns:
            ray.shutdown()
        raise
    return WorkerPlan(num_workers=num_workers, gpus_per_worker=gpus, address=cluster.address,
                      owns_ray=owns, resources=resources)


def _warn_unless_loopback() -> None:
    """A Ray started here listens on every interface unless its node address is the loopback
    one (`orchestrator.cluster.background.loopback_only`, which must act before `import ray`)."""
    address = ray.util.get_node_ip_address()
    if not address.startswith("127."):
        log.warning("Ray started on %s and listens on every interface of this machine: set "
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is imported for 127.0.0.1 "
                    "only", address)


#: Ray's setting (read from the environment when this process joins) for how long a process
#: waits for a head (GCS) that stopped answering before Ray ends the process, 60 s by default.
GCS_RECONNECT_ENV = "RAY_gcs_rpc_server_reconnect_timeout_s"


def _outlive_the_head(lost_timeout_s: float) -> None:
    """Keep the driver alive past a head that died, so that the sweep ends itself after
    `cluster.lost_timeout_s` (runs KILLED, exit 3) rather than being ended by Ray after 60 s with
    its runs left RUNNING. A value the user set is kept."""
    os.environ.setdefault(GCS_RECONNECT_ENV, str(int(2 * lost_timeout_s + 300)))


def disconnect(plan: WorkerPlan) -> None:
    """Shut Ray down if `connect` started or joined it; leave a Ray it found running alone (less
    the workers started for this sweep that it never used)."""
    if plan.prestarted is not None:
        plan.prestarted.release()
        plan.prestarted = None
    if plan.owns_ray and ray.is_initialized():
        ray.shutdown()


def _resolve_workers(cluster: ClusterCfg, resources: dict[str, float]) -> tuple[int, float]:
    total_gpus = resources.get("GPU", 0.0)
    total_cpus = resources.get("CPU", 0.0)
    gpus = cluster.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total_gpus > 0 else 0.0
    if gpus > 0 and total_gpus == 0:
        raise ClusterUnavailable(
            "cluster.gpus_per_worker", f"{gpus} asked, but the Ray cluster has no GPUs (use 0)")
    # Each worker also holds one CPU slot, so CPUs bound the count on GPU clusters too.
    capacity = int(total_cpus)
    if gpus > 0:
        capacity = min(capacity, math.floor(total_gpus / gpus + 1e-9))
    if cluster.num_workers is not None:
        if cluster.num_workers > capacity:
            # An autoscaling cluster may grow to fit; a fixed one leaves the extra workers waiting.
            log.warning("cluster.num_workers=%d exceeds what the cluster holds now (%d): the rest "
                        "wait for resources", cluster.num_workers, capacity)
        return cluster.num_workers, float(gpus)
    if gpus > 0:
        return max(1, capacity), float(gpus)
    return max(1, min(capacity, MAX_CPU_WORKERS)), 0.0


def worker_env(plan: WorkerPlan) -> dict[str, str]:
    env = dict(WORKER_ENV)
    if not plan.address.startswith("ray://"):
        # Ray puts only the driver's cwd on workers' paths; run from elsewhere, a checkout that is
        # not pip-installed would not import. Nodes share the layout (Ray's own assumption);
        # Ray expands ${PYTHONPATH} to the node's value.
        env["PYTHONPATH"] = f"{_CODE_ROOT}{os.pathsep}${{PYTHONPATH}}"
    return env
