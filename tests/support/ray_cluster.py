"""A real Ray cluster on loopback for tests: `ray start --head` plus `ray start --address` nodes.

Each node is its own `ray start --block` process, leader of a session of its own
(`start_new_session`). Its raylet and agents share its process group; Ray puts each worker in a
process group of its own, inside that session. So the test ends a node, raylet, agents and
workers, by the ids of the process groups of its session (`kill`), never with `ray stop`, which
ends every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))

#: Ray's own settings, for the head's GCS: a node whose raylet stopped answering is declared dead
#: after ~5 s instead of ~30 s (its health checks: every period, this many missed in a row).
FAST_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
              "RAY_health_check_failure_threshold": "5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(extra: dict | None = None) -> dict[str, str]:
    """This process's environment without RAY_ variables, plus what every process of a cluster
    started here must agree on: Ray 2.60 turns token auth on for a head where ~/.ray/auth_token
    exists, and then every process needs RAY_AUTH_MODE=token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if (Path.home() / ".ray" / "auth_token").exists():
        env["RAY_AUTH_MODE"] = "token"
    return {**env, **(extra or {})}


class Node:
    """One `ray start --block` process and everything it started, in its own process group."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str],
                 prefix: list[str] | None = None):
        """`prefix` runs `ray start` through another command (`ip netns exec NS`), which execs it
        in the same process: the session is still this node's."""
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([*(prefix or []), RAY, "start", "--block", *args], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_started(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL to every process group of the node's session: its raylet, agents and workers
        at once, as `kill -9`."""
        groups = {self.proc.pid}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        self._log.close()

    def pids(self) -> list[int]:
        """The processes of this node's session (its workers among them)."""
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    if os.getsid(int(name)) == self.proc.pid:
                        found.append(int(name))
        return found

    def pack_workers(self) -> list:
        import psutil

        found = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error, IndexError):
                p = psutil.Process(pid)
                if p.cmdline()[0].startswith("ray::PackWorker"):
                    found.append(p)
        return found


class Cluster:
    """A head and `nodes` more on `ip` (127.0.0.1), `cpus` CPUs each; `address` is the head's
    HOST:PORT. Use as a context manager: every node is killed by its group on exit."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int = 1, env: dict | None = None,
                 ip: str = "127.0.0.1"):
        self.root, self.ip = root, ip
        self.env = ray_env(env)
        # Ray's socket paths must stay short: a temp folder of its own under /tmp.
        self.temp_dir = tempfile.mkdtemp(prefix="qo-ray-", dir="/tmp")
        port = free_port()
        self.address = f"{ip}:{port}"
        self.head = Node(["--head", "--node-ip-address", ip, "--port", str(port),
                          "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir", self.temp_dir,
                          "--include-dashboard", "false",
                          "--ray-client-server-port", str(free_port()),
                          "--dashboard-agent-listen-port", str(free_port())],
                         root / "head.log", {**self.env, **FAST_DEATH})
        self.nodes: list[Node] = []
        try:
            self.head.wait_started()
            for i in range(nodes):
                self.add_node(cpus, i)
        except BaseException:
            self.close()
            raise

    def add_node(self, cpus: int, index: int, ip: str | None = None,
                 prefix: list[str] | None = None) -> Node:
        """A node on `ip` (the head's), its `ray start` run through `prefix` if given."""
        node = Node(["--address", self.address, "--node-ip-address", ip or self.ip,
                     "--num-cpus", str(cpus), "--num-gpus", "0",
                     "--dashboard-agent-listen-port", str(free_port())],
                    self.root / f"node{index}.log", self.env, prefix)
        self.nodes.append(node)
        node.wait_started()
        return node

    def close(self) -> None:
        for node in [*self.nodes, self.head]:
            node.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
