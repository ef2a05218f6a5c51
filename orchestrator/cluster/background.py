"""Starting Ray in the background, so that the driver's own setup overlaps it.

Ray's start is mostly waiting for its processes (GCS, raylet, workers); the driver meanwhile
imports MLflow and opens (creating, on first use) the tracking store. Nothing is imported here
at module level: importing Ray itself is part of what runs in the background.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future

from orchestrator.config.schema import ClusterCfg

PARK_S = 0.5

#: Read by Ray once, when it is imported: "0" gives a Ray started here the node address 127.0.0.1,
#: and Ray's GCS, raylet, workers and agents then listen on the loopback address only (for any
#: other node address they listen on every interface). Set for `cluster.address=local` alone:
#: a node that joins a cluster needs an address the others can reach.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only(cluster: ClusterCfg) -> None:
    """Before Ray is imported: a local Ray listens on 127.0.0.1 only (a value the user set is
    kept; `orchestrator.cluster.connect` warns when Ray was imported before this could act)."""
    if cluster.address == "local":
        os.environ.setdefault(LOOPBACK_ENV, "0")


def start_connect(cluster: ClusterCfg, workers: int = 0) -> Future:
    """`connect(cluster)` running in a thread; its result is the WorkerPlan (or its error). With
    `workers`, up to that many of the plan's workers are created at once (`prestart`): their
    imports then overlap the driver's own setup (the tracking store, the planner)."""
    future: Future = Future()
    loopback_only(cluster)
    threading.Thread(target=_connect, args=(cluster, future, workers), name="ray-start",
                     daemon=True).start()
    return future


def _connect(cluster: ClusterCfg, future: Future, workers: int = 0) -> None:
    from orchestrator.cluster.connect import connect

    try:
        plan = connect(cluster)
        if workers:
            from orchestrator.cluster.dispatch import prestart

            plan.prestarted = prestart(plan, workers)
    except BaseException as e:
        future.set_exception(e)
        return
    future.set_result(plan)
    if plan.owns_ray:
        import ray

        # Ray's local processes die with the thread that started them (Linux's parent-death
        # signal is per thread), so this thread lives until the sweep shuts Ray down.
        while ray.is_initialized():
            time.sleep(PARK_S)


def abandon(future: Future) -> None:
    """Undo a background start the sweep will not use: wait for it, then disconnect."""
    with contextlib.suppress(BaseException):
        from orchestrator.cluster.connect import disconnect

        disconnect(future.result())
