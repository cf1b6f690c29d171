"""sk_lookup steering in a network namespace of a test's own: local echo targets, a
handed-in proxy and pinned BPF state (test_bpf.py, test_proxy_protocol.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from helpers import PYTHON, REPO, ProxyProcess, TaggedBackend, connect, greet
from netns import NetNS

LISTEN_PORT = 9999  # the proxy's one listener inside the namespace; not a configured port


class Steered:
    """One namespace: local echo targets, a single-listener proxy, and pinned BPF state."""

    def __init__(self, tmp_path: Path, bpffs: Path, document: dict):
        self.ns = NetNS()
        self.pin_dir = bpffs / self.ns.name.replace("-", "_")
        self.cfg = tmp_path / "config.json"
        self.backends: list[TaggedBackend] = []
        self.proxy: ProxyProcess | None = None
        self.write(document)

    def write(self, document: dict) -> None:
        self.document = document
        tmp = self.cfg.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        tmp.replace(self.cfg)

    def start_backends(self) -> None:
        """A tagged echo for each 127.0.0.1 target, tagged with the app's name."""
        with self.ns.entered():
            for app in self.document["Apps"]:
                for target in app["Targets"]:
                    host, port = target.rsplit(":", 1)
                    if host == "127.0.0.1":
                        self.backends.append(TaggedBackend(app["Name"], int(port)))

    def bpf(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = self.ns.exec([PYTHON, "-m", "appliance", "bpf", *args, "--pin-dir",
                               str(self.pin_dir)], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if check:
            assert result.returncode == 0, result.stderr
        return result

    def load(self, *extra: str) -> str:
        return self.bpf("load", "-c", str(self.cfg), *extra).stdout

    def start_proxy(self, listen: str = f"[::]:{LISTEN_PORT}") -> ProxyProcess:
        self.proxy = ProxyProcess(self.cfg, "--listen", listen, host=None,
                                  wrap=self.ns.command([]))
        return self.proxy

    def register(self) -> int:
        out = self.bpf("register", "--pid", str(self.proxy.pid)).stdout
        return int(out.rsplit("socket cookie ", 1)[1].rstrip(")\n"))

    def status(self) -> dict:
        return json.loads(self.bpf("status", "--json").stdout)

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
        return connect(port, host, timeout, namespace=self.ns.entered)

    def greet(self, port: int, host: str = "127.0.0.1") -> str:
        return greet(port, host, namespace=self.ns.entered)

    def close(self) -> None:
        if self.proxy:
            self.proxy.stop()
        for b in self.backends:
            b.stop()
        self.bpf("unload", check=False)
        self.ns.delete()
