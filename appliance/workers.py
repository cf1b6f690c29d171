"""Worker processes, as the supervisor (``supervisor.py``) sees them.

A worker is a fresh ``flyproxy serve`` (exec'd: no event loop state is inherited across
fork) given the listening sockets, the config in force (in an anonymous file: not the
file on disk, which may hold an edit not yet reloaded) and one end of a socketpair, its
*channel*, which carries the control protocol (``control.py``: one JSON line each way,
requests answered in order). A worker whose channel closes (its supervisor gone) shuts
down gracefully by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket

REQUEST_TIMEOUT_S = 30.0
CHANNEL_LIMIT = 64 * 1024 * 1024  # a status line lists every port: 10,000 ports is ~60 KB


def count(text: str) -> int:
    """``--workers``: a number, or ``auto`` for the CPUs this process may run on."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ValueError(f"--workers {text}: expected 1 to 64 or auto")
    return int(text)


class WorkerGone(Exception):
    pass


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


class Worker:
    """One worker process and its channel; requests on it are answered in order."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = False
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid if self.proc else '-'})"

    async def start(self, argv: list[str], fds: list[int], config: bytes) -> None:
        """Start the worker on ``config`` (the bytes in force, not the file: it may hold an
        edit not yet reloaded, or a broken one), handed over in an anonymous file."""
        mine, theirs = socket.socketpair()
        config_fd = _anonymous_file(config)
        try:
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            self.proc = await asyncio.create_subprocess_exec(
                *argv, "--worker-channel", str(theirs.fileno()), "--config-fd", str(config_fd),
                pass_fds=[*fds, theirs.fileno(), config_fd], env=env,
                stdin=asyncio.subprocess.DEVNULL)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()  # the worker has it; EOF on ours means the worker is gone
            os.close(config_fd)
        self._reader, self._writer = await asyncio.open_connection(sock=mine, limit=CHANNEL_LIMIT)

    async def request(self, command: str, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
        if self._writer is None:
            raise WorkerGone(f"{self} is not running")
        async with self._lock:
            try:
                self._writer.write(json.dumps({"command": command}).encode() + b"\n")
                await self._writer.drain()
                async with asyncio.timeout(timeout_s):
                    line = await self._reader.readline()
            except (ConnectionError, OSError) as e:
                raise WorkerGone(f"{self}: {e}") from None
            except TimeoutError:
                self.kill()  # its channel is out of step now; a fresh worker replaces it
                raise WorkerGone(f"{self} did not answer {command!r} in {timeout_s:g}s; "
                                 "killed") from None
        if not line:
            raise WorkerGone(f"{self} exited")
        return json.loads(line)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def close_channel(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self.ready = False
