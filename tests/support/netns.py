"""A network namespace of its own for a test's Ray node: a veth pair joins it to this machine,
and `cut()` / `restore()` take that link down and up, a partition and its end (the node's
processes keep running). Needs root (`ip netns`); `NetNs.available()` says whether it works here.
Ended by `close()`: the namespace and the link are deleted, by their own names."""

from __future__ import annotations

import os
import random
import subprocess


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NetNs:
    """`name` is the namespace; `host_ip` this machine's end of the link, `ns_ip` the other."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.name, self._host, self._peer = f"qo-ns{tag}", f"qo-h{tag}", f"qo-n{tag}"
        net = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.host_ip, self.ns_ip = f"{net}.1", f"{net}.2"
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self._host, "type", "veth", "peer", "name", self._peer)
            _ip("link", "set", self._peer, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self._host)
            _ip("link", "set", self._host, "up")
            self.run("ip", "addr", "add", f"{self.ns_ip}/24", "dev", self._peer)
            self.run("ip", "link", "set", self._peer, "up")
            self.run("ip", "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def available() -> bool:
        probe = f"qo-probe{os.getpid()}"
        ok = _ip("netns", "add", probe, check=False).returncode == 0
        _ip("netns", "del", probe, check=False)
        return ok

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def run(self, *argv: str) -> None:
        subprocess.run([*self.prefix, *argv], capture_output=True, text=True, check=True)

    def cut(self) -> None:
        _ip("link", "set", self._host, "down")

    def restore(self) -> None:
        _ip("link", "set", self._host, "up")

    def close(self) -> None:
        _ip("link", "del", self._host, check=False)  # its peer goes with it
        _ip("netns", "del", self.name, check=False)

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
