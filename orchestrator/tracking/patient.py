"""`PatientClient`: the tracker's MlflowClient for a tracking server that may stop answering.

Writes made while the sweep trains go through `later`: done at once while the server answers;
while it does not, kept in order (metrics stay in the tracker's buffer) and done by `catch_up`,
tried again every few seconds from the driver's loop, so dispatch, and training, go on. Any other
call (a read, or the sweep's end) first catches up, waiting for the server. A note on stderr says
when the server stops answering and when it answers again; after `tracking.lost_timeout_s`
without an answer, `SweepLost("tracking.uri", ...)`: the sweep ends with exit status 3,
resumable. A write is only ever tried again whole: MLflow keeps one row for a metric point
logged twice with the same step, time and value, and tags, params and statuses are set again to
the same values.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections import deque

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.cluster.lost import SweepLost

#: MLflow's own settings for a tracking server: a request that gets no answer fails after one
#: quick retry and 10 s at most (PatientClient tries it again).
SERVER_REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                      # "View run at ..." after every run ended: the console says where, once
                      "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
#: No answer, or an answer that says the server cannot serve now: a 5xx (its store is down,
#: a gateway in front of it has no backend), once MLflow's own retry of it gave up.
_UNANSWERED = re.compile(r"failed with exception|error code 5\d\d|too many 5\d\d error responses|"
                         r"Connection refused|Max retries exceeded|Read timed out|"
                         r"RemoteDisconnected", re.I)
RETRY_S = 2.0  # between tries while the server does not answer


def unanswered(error: BaseException) -> bool:
    """True when `error` says the tracking server did not answer (as opposed to refusing)."""
    import requests

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout |
                  ConnectionError):
        return True
    return isinstance(error, MlflowException) and bool(_UNANSWERED.search(str(error)))


class PatientClient:
    """An MlflowClient that waits for a tracking server that stops answering (module docstring)."""

    def __init__(self, client: MlflowClient, uri: str, timeout_s: float, server: bool = True):
        """`server`: `uri` is a tracking server; its requests then fail in seconds (this class
        tries them again, and says so) instead of MLflow's own silent backoff of minutes."""
        self._client, self._uri, self._timeout = client, uri, timeout_s
        self._pending: deque = deque()  # (unit, key): writes kept while the server is away
        self._since: float | None = None  # when the server stopped answering
        self._tried = 0.0
        self._direct = False  # inside a unit: its calls go straight to MLflow
        if server:
            for name, value in SERVER_REQUEST_ENV.items():
                os.environ.setdefault(name, value)

    @property
    def waiting(self) -> int:
        """Writes kept for when the server answers again."""
        return len(self._pending)

    def later(self, unit, key: str | None = None) -> None:
        """Do `unit` (a few calls of this client) now, or, while the server does not answer,
        after the ones kept before it. A `key` already waiting is not kept twice."""
        if key is None or all(k != key for _, k in self._pending):
            self._pending.append((unit, key))
        self.catch_up()

    def catch_up(self, wait: bool = False) -> None:
        """Do the kept writes, oldest first. While the server does not answer: with `wait`, try
        every RETRY_S until it does; without, return (tried again at most every RETRY_S).
        Raises SweepLost once it has not answered for the timeout."""
        while self._pending:
            since_try = time.monotonic() - self._tried
            if self._since is not None and since_try < RETRY_S:
                if not wait:
                    return
                time.sleep(RETRY_S - since_try)
            self._tried = time.monotonic()
            unit, _ = self._pending[0]
            self._direct = True
            try:
                unit()
            except Exception as e:
                if not unanswered(e):
                    raise
                self._unanswered(e, getattr(unit, "__name__", "write"))
                continue
            finally:
                self._direct = False
            self._pending.popleft()
            self._answered()

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr) or self._direct:
            return attr

        @functools.wraps(attr)
        def patient(*args, **kwargs):
            return self._call(attr, name, args, kwargs)

        return patient

    def _call(self, fn, name: str, args, kwargs):
        self.catch_up(wait=True)  # in order: what was kept goes first
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not unanswered(e):
                    raise
                self._unanswered(e, name)
                time.sleep(RETRY_S)
                continue
            self._answered()
            return result

    def _unanswered(self, error: BaseException, name: str) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
            print(f"note: the tracking server {self._uri} does not answer "
                  f"({type(error).__name__}); trying again for up to {self._timeout:g} s "
                  "(tracking.lost_timeout_s); training goes on and what it logs is kept",
                  file=sys.stderr, flush=True)
        if now - self._since >= self._timeout:
            raise SweepLost("tracking.uri", (
                f"the tracking server {self._uri} did not answer for {self._timeout:g} s "
                f"(last: {name}: {' '.join(str(error).split())[:300]})")) from error

    def _answered(self) -> None:
        if self._since is not None:
            print(f"note: the tracking server {self._uri} answers again after "
                  f"{time.monotonic() - self._since:.0f} s; nothing logged was lost",
                  file=sys.stderr, flush=True)
            self._since = None
