"""`PatientClient`: the tracker's MlflowClient for a tracking server that may stop answering.

Every call that gets no answer (connection refused, timed out, 502/503/504) is tried again,
whole, with a note on stderr when the server stops answering and another when it is back; the
driver waits meanwhile, and the workers go on training (their points wait in the driver's
queue), so nothing logged is lost. After `tracking.lost_timeout_s` without an answer the call
raises `SweepLost("tracking.uri", ...)`: the sweep ends with exit status 3, resumable.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.config.errors import SweepLost

#: MLflow's own settings for a tracking server: a request that gets no answer fails after one
#: quick retry and 30 s at most (PatientClient retries it).
SERVER_REQUEST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                      # "View run at ..." after every run ended: the console says where, once
                      "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
_UNANSWERED = re.compile(r"failed with exception|error code 50[234]|Connection refused|"
                         r"Max retries exceeded|Read timed out|RemoteDisconnected", re.I)
RETRY_DELAYS_S = (1, 2, 4, 8)  # between tries of one call, then every 8 s


def unanswered(error: BaseException) -> bool:
    """True when `error` says the tracking server did not answer (as opposed to refusing)."""
    import requests

    if isinstance(error, requests.exceptions.ConnectionError | requests.exceptions.Timeout |
                  ConnectionError):
        return True
    return isinstance(error, MlflowException) and bool(_UNANSWERED.search(str(error)))


class PatientClient:
    """An MlflowClient whose every call, while the tracking server does not answer, is tried
    again (and said so once on stderr) for up to `timeout_s` from the first failure; then
    `SweepLost("tracking.uri")` (exit 3). A call is only ever retried whole: MLflow ignores a
    metric point logged twice with the same step, time and value, and tags and params are set
    to the same values. Meanwhile the workers go on training; their points wait in the queue.
    """

    def __init__(self, client: MlflowClient, uri: str, timeout_s: float, server: bool = True):
        """`server`: `uri` is a tracking server; its requests then fail in seconds (this class
        retries them, and says so) instead of MLflow's own silent backoff of minutes."""
        self._client, self._uri, self._timeout = client, uri, timeout_s
        if server:
            for name, value in SERVER_REQUEST_ENV.items():
                os.environ.setdefault(name, value)

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def patient(*args, **kwargs):
            return self._call(attr, name, args, kwargs)

        return patient

    def _call(self, fn, name: str, args, kwargs):
        since = None
        tries = 0
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                if not unanswered(e):
                    raise
                now = time.monotonic()
                if since is None:
                    since = now
                    print(f"note: the tracking server {self._uri} does not answer "
                          f"({type(e).__name__}); retrying for up to {self._timeout:g} s "
                          "(tracking.lost_timeout_s); training goes on", file=sys.stderr,
                          flush=True)
                if now - since >= self._timeout:
                    raise SweepLost("tracking.uri", (
                        f"the tracking server {self._uri} did not answer for "
                        f"{self._timeout:g} s (last: {name}: {' '.join(str(e).split())[:300]})"
                    )) from e
                time.sleep(min(RETRY_DELAYS_S[min(tries, len(RETRY_DELAYS_S) - 1)],
                               max(0.0, self._timeout - (now - since))))
                tries += 1
                continue
            if since is not None:
                print(f"note: the tracking server {self._uri} answers again after "
                      f"{time.monotonic() - since:.0f} s; nothing logged was lost",
                      file=sys.stderr, flush=True)
            return result
