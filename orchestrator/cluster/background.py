"""Starting Ray in the background, so that the driver's own setup overlaps it.

Ray's start is mostly waiting for its processes (GCS, raylet, workers); the driver meanwhile
imports MLflow and opens (creating, on first use) the tracking store. Nothing is imported here
at module level: importing Ray itself is part of what runs in the background.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

from orchestrator.config.schema import ClusterCfg


def start_connect(cluster: ClusterCfg) -> Future:
    """`connect(cluster)` running in a thread; its result is the WorkerPlan (or its error)."""

    def run():
        from orchestrator.cluster.connect import connect

        return connect(cluster)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-start")
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def abandon(future: Future) -> None:
    """Undo a background start the sweep will not use: wait for it, then disconnect."""
    with contextlib.suppress(BaseException):
        from orchestrator.cluster.connect import disconnect

        disconnect(future.result())
