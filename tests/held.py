"""Connections an upgrade must not break, and a prober that it must not refuse.

:class:`Held` opens connections through the proxy to an echo target (helpers'
TaggedBackend: it greets with its tag, echoes, and answers an EOF with ``bye``): some idle,
some streaming, bytes flowing all the time with a sha256 of each direction; or to a plain
echo (the demo's flyproxy-echo.service: no greeting, and an EOF answered with EOF). :class:`Prober`
opens a new connection every 20 ms. Both check what they get back and only report:
``finish()`` returns the problems ([] when all is well), for the test to assert on.
Behind several hosts (tests/fleet: one address, a target per host greeting with its own
tag) ``tag`` is a tuple of the tags any connection may meet, and each connection records
the one it met (``landed``): which host it went to.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from helpers import connect, read_line, recv_all

CHUNK = 64 * 1024
PACE_S = 0.02  # a streaming connection sends a chunk this often; the prober probes so often
MAX_PROBES = 6000  # the prober's bound (two minutes)


class _Stream:
    """One streaming connection: a sender thread and a reader thread."""

    def __init__(self, sock: socket.socket, stop: threading.Event, bye: bytes):
        self.sock, self.stop, self.bye = sock, stop, bye
        self.sent, self.received = hashlib.sha256(), hashlib.sha256()
        self.received_bytes = 0
        self.error: str | None = None
        self.threads = [threading.Thread(target=self._send, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        try:
            while not self.stop.wait(PACE_S):  # the sending rate, not a wait for an event
                data = os.urandom(CHUNK)
                self.sent.update(data)
                self.sock.sendall(data)
            self.sent.update(self.bye)  # (what the target answers an EOF with)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = f"send: {e!r}"

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(1 << 20):
                self.received.update(chunk)
                self.received_bytes += len(chunk)
        except OSError as e:
            self.error = f"read: {e!r}"

    def finish(self) -> str | None:
        for t in self.threads:
            t.join(60)
        if any(t.is_alive() for t in self.threads):
            return "did not end within 60 s"
        if self.error:
            return self.error
        if self.sent.digest() != self.received.digest():
            return f"the bytes differ ({self.received_bytes} received)"
        return None


def _tags(tag: str | tuple[str, ...] | None) -> tuple[bytes, ...] | None:
    if tag is None:
        return None
    return tuple(t.encode() for t in ((tag,) if isinstance(tag, str) else tag))


class Held:
    """``idle`` connections (greeted, then silent until ``finish``) and ``streaming`` ones
    to ``host``:``port``, whose target greets with ``tag`` (a tuple: any of them; None: a
    plain echo)."""

    def __init__(self, port: int, tag: str | tuple[str, ...] | None, namespace,
                 idle: int = 10, streaming: int = 10, host: str = "127.0.0.1"):
        self.tags = _tags(tag)
        self.bye = b"bye\n" if tag is not None else b""
        self._halt = threading.Event()
        self.landed: dict[str, str] = {}  # "idle 3" -> the tag it was greeted with
        self.idle = [self._open(f"idle {i}", host, port, namespace) for i in range(idle)]
        self.streams = [_Stream(self._open(f"streaming {i}", host, port, namespace),
                                self._halt, self.bye) for i in range(streaming)]

    def _open(self, name: str, host: str, port: int, namespace) -> socket.socket:
        s = connect(port, host, namespace=namespace, timeout=30)
        s.settimeout(60)
        if self.tags is not None:
            line = read_line(s)
            assert line in self.tags, f"{name}: greeted with {line!r}, not one of {self.tags}"
            self.landed[name] = line.decode()
        return s

    def received(self) -> list[int]:
        """Bytes each streaming connection has read back so far."""
        return [s.received_bytes for s in self.streams]

    def finish(self) -> list[str]:
        """End every connection (idle ones: a line echoed, then EOF answered); the
        problems, one per connection that did not come through whole, each starting with
        the connection's name (a key of ``landed``)."""
        problems = []
        for i, s in enumerate(self.idle):
            try:
                s.sendall(b"still here\n")
                ok = read_line(s) == b"still here"
                s.shutdown(socket.SHUT_WR)
                ok = ok and recv_all(s) == self.bye
            except OSError as e:
                ok = False
                problems.append(f"idle {i}: {e!r}")
            else:
                if not ok:
                    problems.append(f"idle {i}: not echoed")
            s.close()
        self._halt.set()
        for i, stream in enumerate(self.streams):
            if (problem := stream.finish()) is not None:
                problems.append(f"streaming {i}: {problem}")
            stream.sock.close()
        return problems


class Prober(threading.Thread):
    """A new connection to ``host``:``port`` every ``pace`` seconds (at most
    ``max_probes``), greeted with ``tag`` (a tuple: any of them), then closed; ``landed``
    counts the greetings."""

    def __init__(self, port: int, tag: str | tuple[str, ...], namespace,
                 host: str = "127.0.0.1", pace: float = PACE_S, max_probes: int = MAX_PROBES):
        super().__init__(daemon=True)
        self.port, self.host, self.tags, self.namespace = port, host, _tags(tag), namespace
        self.pace, self.max_probes = pace, max_probes
        self.ok, self.failed = 0, []
        self.landed: dict[str, int] = {}
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        for _ in range(self.max_probes):
            if self._halt.wait(self.pace):  # the probe rate, not a wait for an event
                return
            try:
                with connect(self.port, self.host, namespace=self.namespace, timeout=10) as s:
                    line = read_line(s)
                if line in self.tags:
                    self.ok += 1
                    self.landed[line.decode()] = self.landed.get(line.decode(), 0) + 1
                else:
                    self.failed.append(f"greeted {line!r}")
            except OSError as e:
                self.failed.append(repr(e))

    def finish(self) -> tuple[int, list[str]]:
        self._halt.set()
        self.join(30)
        return self.ok, self.failed
