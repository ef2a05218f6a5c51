"""`SweepLost`: the sweep cannot go on because something it runs on is gone.

Raised by the dispatcher (no node could host a worker for `cluster.lost_timeout_s`) and by the
tracking client (the server stopped answering for `tracking.lost_timeout_s`); the driver
(`orchestrator.sweep`) catches it, ends the open runs KILLED and prints the command that resumes.
It is not bad input (that is `orchestrator.config.errors.ConfigError`, exit 2): exit status 3.
"""

from __future__ import annotations


class SweepLost(RuntimeError):
    """The sweep cannot go on: no node could host a worker for `cluster.lost_timeout_s`, or the
    tracking server stopped answering. Open runs end KILLED with `reason`; the CLI prints the
    command that resumes and exits with status 3."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = " ".join(str(reason).split())
        super().__init__(self.reason)
