"""A steady stream of short connections, counted, for "zero failures during X" tests."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time

from helpers import read_line


class LoadGenerator(threading.Thread):
    """Opens one connection after another to ``ports`` (round robin) and checks each echoes.

    Bounded: stops after ``max_connections`` or ``max_seconds``, or when ``stop()`` is called.
    ``namespace`` is a context manager factory that moves this thread into a network namespace.
    """

    def __init__(self, ports: list[int], host: str = "127.0.0.1", namespace=None,
                 max_connections: int = 20000, max_seconds: float = 120,
                 connect_timeout_s: float = 10):
        super().__init__(daemon=True)
        self.ports, self.host = ports, host
        self.namespace = namespace or contextlib.nullcontext
        self.max_connections, self.max_seconds = max_connections, max_seconds
        self.connect_timeout_s = connect_timeout_s
        self.ok = 0
        self.failures: list[str] = []
        self._stop_event = threading.Event()
        self.first_done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with self.namespace():
            for n, port in zip(range(self.max_connections), itertools.cycle(self.ports)):
                if self._stop_event.is_set() or time.monotonic() > deadline:
                    break
                self._one(n, port)
                self.first_done.set()

    def _one(self, n: int, port: int) -> None:
        line = f"load {n}".encode()
        try:
            with socket.create_connection((self.host, port), timeout=self.connect_timeout_s) as s:
                s.settimeout(self.connect_timeout_s)
                tag = read_line(s)
                s.sendall(line + b"\n")
                echoed = read_line(s)
            if not tag or echoed != line:
                self.failures.append(f"port {port}: tag {tag!r} echo {echoed!r}")
            else:
                self.ok += 1
        except OSError as e:
            self.failures.append(f"port {port}: {e!r}")

    def stop(self) -> tuple[int, list[str]]:
        self._stop_event.set()
        self.join(self.connect_timeout_s * 3)
        assert not self.is_alive(), "load generator did not stop"
        return self.ok, self.failures
