"""Network namespaces for tests that steer ports with BPF, so they never touch the host's."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import uuid
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered_path(path: str):
    """Move the calling thread into the network namespace at ``path`` for the block."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(home)
        os.close(target)


class NetNS:
    """``ip netns add`` with loopback up; ``entered()`` moves the calling thread into it."""

    def __init__(self, prefix: str = "flyproxy-test"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.exec(["ip", "link", "set", "lo", "up"], check=True)

    def command(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def exec(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("timeout", 60)
        return subprocess.run(self.command(cmd), **kw)

    def entered(self):
        """Sockets created inside this block live in the namespace (setns is per thread)."""
        return entered_path(f"/run/netns/{self.name}")

    def etc(self, *, resolv_conf: str | None = None, hosts: str | None = None) -> None:
        """Files that ``ip netns exec`` bind-mounts over /etc's for commands it runs here
        (/etc/netns/NAME/...): a resolver and a hosts file of the test's own."""
        directory = Path("/etc/netns") / self.name
        directory.mkdir(parents=True, exist_ok=True)
        if resolv_conf is not None:
            (directory / "resolv.conf").write_text(resolv_conf)
        if hosts is not None:
            (directory / "hosts").write_text(hosts)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)
        shutil.rmtree(Path("/etc/netns") / self.name, ignore_errors=True)
