"""A sweep's lease: its parent run names the driver that holds it and when it last said so.

The driver tags the parent run with `qlora.driver` (host and pid) when it starts or resumes the
sweep, and renews `qlora.heartbeat` every `HEARTBEAT_S` while it runs (`Tracker.flush`).
`resume=true` takes a RUNNING parent only when its driver is gone: on this host, its process no
longer exists; on another, its heartbeat is older than `LEASE_S`. Otherwise two drivers would
train the same trials into the same checkpoints and end each other's runs.
"""

from __future__ import annotations

import json
import os
import socket
import time

from orchestrator.tracking.keys import DRIVER_TAG, HEARTBEAT_TAG, LEASE_S


def holder() -> dict[str, str]:
    """The tags that say this process holds a sweep, now."""
    return {DRIVER_TAG: json.dumps({"host": socket.gethostname(), "pid": os.getpid()}),
            HEARTBEAT_TAG: f"{time.time():.0f}"}


def heartbeat() -> dict[str, str]:
    return {HEARTBEAT_TAG: f"{time.time():.0f}"}


def live_holder(run) -> str | None:
    """'driver on HOST, last seen N s ago' when a RUNNING parent run's driver still lives, else
    None (ended, lost, or a run from before leases: free to resume)."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    try:
        driver = json.loads(tags[DRIVER_TAG])
        seen = float(tags[HEARTBEAT_TAG])
        host, pid = str(driver["host"]), int(driver["pid"])
    except (KeyError, ValueError, TypeError):
        return None
    age = max(0.0, time.time() - seen)
    if host == socket.gethostname():
        alive = pid != os.getpid() and _exists(pid)
    else:
        alive = age < LEASE_S
    return f"driver on {host}, last seen {age:.0f} s ago" if alive else None


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
