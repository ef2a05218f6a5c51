"""Real servers on loopback for tests: an `mlflow server` with proxied artifacts, and moto's
standalone S3 server. Each runs in a session (and process group) of its own and is ended by
that group's id, never by name."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from support.ray_cluster import free_port

BIN = Path(sys.executable).parent


class Server:
    """A process started in its own session; `stop()` kills its process group."""

    def __init__(self, argv: list[str], log: Path, url: str, ready_path: str,
                 env: dict | None = None):
        self.url, self.log_path = url, log
        self._argv, self._env, self._ready = argv, env, ready_path
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 90.0) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115
        self.proc = proc = subprocess.Popen(self._argv, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(self._env or {})},
                                            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + self._ready, timeout=2):
                    return
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self._argv[0]} did not start:\n"
                                   f"{self.log_path.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MlflowServer(Server):
    """`mlflow server` over a SQLite file, with artifacts proxied by the server into `artifacts`
    (clients upload through HTTP and never see the folder)."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.artifacts = root / "server-artifacts"
        port = port or free_port()
        super().__init__([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{root}/server.db",
                          "--artifacts-destination", str(self.artifacts), "--workers", "1"],
                         root / "mlflow-server.log", f"http://127.0.0.1:{port}", "/health")


class MotoS3(Server):
    """moto's standalone server: an S3 endpoint on loopback; `env` is what a client needs."""

    def __init__(self, root: Path, authenticate: bool = False):
        """`authenticate`: moto checks every request's key against its IAM users (it has none:
        any key is refused, as a wrong key is by S3); by default it takes any key."""
        port = free_port()
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if authenticate else None
        super().__init__([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                         root / f"moto-{port}.log", f"http://127.0.0.1:{port}", "/moto-api/",
                         env=env)
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "qlora-test-key",
                    "AWS_SECRET_ACCESS_KEY": "qlora-test-secret-7f3a", "AWS_DEFAULT_REGION":
                    "us-east-1"}

    def fs(self):
        """An s3fs filesystem on this server (listings uncached: other processes write)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.env["AWS_ACCESS_KEY_ID"],
                                 secret=self.env["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.url, use_listings_cache=False)
