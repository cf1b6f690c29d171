"""Worker processes, as the supervisor (``supervisor.py``) sees them.

A worker is a fresh ``flyproxy serve`` (exec'd: no event loop state is inherited across
fork) given the listening sockets, the config in force (in an anonymous file: not the
file on disk, which may hold an edit not yet reloaded) and one end of a socketpair, its
*channel*, which carries the control protocol (``control.py``: one JSON line each way,
each reply carrying its request's id; requests run concurrently, so a heartbeat is
answered while a reload waits on DNS). A worker whose channel closes (its supervisor
gone) shuts down gracefully by itself.

A worker that misses a deadline is killed (its channel is out of step, and it may be hung:
SIGSTOP, a bug); the supervisor starts another. A reply that comes late anyway (from a
worker that woke up before the kill landed) carries an old id and is dropped, never taken
for the answer to a later request.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import signal
import socket

from ..settings import ServeConfig
from . import code

# Deadlines for a worker's answer. Each is shorter than what waits on it: a reload's
# (control.REQUEST_TIMEOUT_S, 80 s, for the whole reload) and a scrape's (Prometheus
# gives 10 s by default).
REQUEST_TIMEOUT_S = 10.0  # status, and whatever has no deadline of its own
RELOAD_TIMEOUT_S = 25.0  # a reload binds ports, reads the file, resolves new names
METRICS_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 3.0  # the supervisor's heartbeat (supervisor.HEARTBEAT_S apart)
RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more exits than this in the window: failing
MAX_BACKOFF_S = 10.0  # the longest pause before a worker is started again
CHANNEL_LIMIT = 64 * 1024 * 1024  # a status line lists every port: 10,000 ports is ~60 KB


class WorkerGone(Exception):
    pass


def brief(command: str) -> str:
    """A command as log lines and errors name it: its first word (a ``health`` command
    carries thousands of targets, which no log line should)."""
    return repr(command.split(" ", 1)[0][:40])


def _retrieve(future: asyncio.Future) -> None:
    """A request's outcome may be set when nobody awaits it any more (the channel broke
    while it was being sent): mark its exception seen, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


def _anonymous_file(data: bytes) -> int:
    """An fd on a file holding ``data``, positioned at its start, with no name anywhere."""
    try:
        fd = os.memfd_create("flyproxy-config", os.MFD_CLOEXEC)
    except OSError:  # no memfd (or filtered): an unnamed temporary file
        import tempfile
        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _limits_fd(settings) -> list[int]:
    """The limits table's fd a worker inherits (``--limits FD:COLUMN``), if it has one."""
    return [int(settings.limits.split(":")[0])] if settings.limits else []


class Worker:
    """One worker process and its channel; replies are matched to requests by id."""

    def __init__(self, index: int, generation: int = 1) -> None:
        self.index = index
        self.generation = generation  # the worker generation (code) it belongs to
        self.draining = False  # a newer generation serves; this one finishes its connections
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        # health check changes not yet sent (coalesced: the latest state of each target)
        self.health_pending: dict[tuple, bool] = {}
        self.health_sending = False
        self.exits: collections.deque[float] = collections.deque()  # recent exits (monotonic)
        self.failing: str | None = None  # why it cannot start, while it cannot
        self.retry_at: float | None = None  # when it is started again (monotonic)
        self.column: int | None = None  # its column in the connection limits' table
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = 0  # the last request id sent
        self._pending: dict[int, asyncio.Future] = {}  # id -> the future its reply settles
        self._replies: asyncio.Task | None = None
        self._drains: set[int] = set()  # ids of drain requests (answered only once drained)
        self._terminated = False  # sent its SIGTERM

    def __repr__(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid if self.proc else '-'})"

    async def start(self, settings: ServeConfig, config: bytes) -> None:
        """Start the worker with ``settings`` (its sockets: ``settings.fd``) on ``config``
        (the bytes in force, not the file: it may hold an edit not yet reloaded, or a
        broken one), handed over in an anonymous file."""
        mine, theirs = socket.socketpair()
        config_fd = _anonymous_file(config)
        try:
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            argv = dataclasses.replace(settings, worker_channel=theirs.fileno(),
                                       config_fd=config_fd).to_argv()
            self.proc = await asyncio.create_subprocess_exec(
                *code.command(["serve", *argv]),
                pass_fds=[*settings.fd, theirs.fileno(), config_fd, *_limits_fd(settings)],
                env=env,
                stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the worker has it; EOF on ours means the worker is gone
            os.close(config_fd)
        self.attach(*await asyncio.open_connection(sock=mine, limit=CHANNEL_LIMIT))

    @property
    def ids(self) -> int:
        """The last request id sent (a re-executed supervisor carries on from it, so a late
        reply to the old image's request is never taken for the answer to a new one)."""
        return self._ids

    @ids.setter
    def ids(self, value: int) -> None:
        self._ids = value

    def busy(self) -> bool:
        """Is an answer under way on the channel (other than a drain's, which may take
        hours)?"""
        return any(ident not in self._drains for ident in self._pending)

    def has_channel(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    def channel_fd(self) -> int:
        return self._writer.get_extra_info("socket").fileno()

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Use this channel: its replies are read by one task and handed to their requests."""
        self._reader, self._writer = reader, writer
        self._replies = asyncio.ensure_future(self._read_replies(reader))

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        why = "exited"
        try:
            while line := await reader.readline():
                reply = json.loads(line)
                future = self._pending.pop(reply.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(reply)
                # else: a late answer to a request that gave up: dropped, never misread
        except (ConnectionError, OSError, ValueError) as e:
            why = f"its channel failed: {e!r}"
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"{self} {why}"))
        self._pending.clear()

    async def request(self, command: str, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
        """Send ``command``, return the reply with its id; a worker that does not answer
        within ``timeout_s`` is killed (WorkerGone says why)."""
        if self._writer is None or self._replies is None or self._replies.done():
            raise WorkerGone(f"{self} is not running")
        self._ids += 1
        ident = self._ids
        future = self._pending[ident] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        if command.startswith("drain "):
            self._drains.add(ident)
        try:
            async with asyncio.timeout(timeout_s):
                self._writer.write(json.dumps({"command": command, "id": ident}).encode()
                                   + b"\n")
                await self._writer.drain()
                return await future
        except TimeoutError:  # (before OSError: in Python 3.11 TimeoutError is one)
            self.kill()
            raise WorkerGone(f"{self} did not answer {brief(command)} in {timeout_s:g}s; "
                             "killed (another is started)") from None
        except (ConnectionError, OSError) as e:
            raise WorkerGone(f"{self}: {brief(command)} failed: {e!r}") from None
        finally:
            self._pending.pop(ident, None)
            self._drains.discard(ident)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM, once: a worker takes a second SIGTERM as "close every connection now"."""
        if not self._terminated:
            self._terminated = True
            self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close_channel(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._replies is not None:
            self._replies.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(WorkerGone(f"{self} exited"))
        self._pending.clear()
        self._reader = self._writer = self._replies = None
        self.ready = False
