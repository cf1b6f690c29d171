"""The supervisor runs the new code too: it re-executes itself in place.

An upgrade replaces the files the supervisor imported at start; its workers are easy
(a new generation is exec'd from the files on disk), the supervisor is not: it holds the
listening sockets, the workers' channels and the control socket, and it is the process
systemd tracks (``MAINPID``; with ``KillMode=mixed`` its exit would end every worker).
``execve`` keeps the PID, the children and every fd not marked close-on-exec, so:

1. :func:`save` writes what the supervisor knows (config in force, generations, each
   worker's pid and channel, counters, the fds of its sockets and of the control client
   waiting for the reload's answer) as JSON into an anonymous file (memfd), and marks
   those fds inheritable;
2. :func:`exec_self` blocks the signals a supervisor handles (a SIGTERM between the exec
   and the new image's handlers would otherwise kill it: the mask and pending signals
   survive ``execve``) and re-executes the supervisor's options (``ServeConfig.to_argv``)
   plus ``--resume-fd``;
3. the new image (``launch.resume``) reads the state back, adopts the workers
   (:class:`Adopted`: waited on through a pidfd, as they are not children that asyncio
   started), installs its signal handlers, unblocks the signals and carries on: it starts
   the new generation and answers the control client.

Before the exec the supervisor is quiet: no request to a worker is under way (so no
half-read reply is left in a buffer that the exec drops), and request ids carry on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def inheritable(fd: int) -> int:
    os.set_inheritable(fd, True)
    return fd


def save(state: dict) -> int:
    """``state`` in an anonymous file: its fd (inheritable), positioned at the start."""
    fd = os.memfd_create("flyproxy-supervisor-state", 0)  # (no MFD_CLOEXEC: it is passed on)
    data = json.dumps(state).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return inheritable(fd)


def load(fd: int) -> dict:
    with os.fdopen(fd, "rb") as f:
        return json.loads(f.read())


def exec_self(command: list[str]) -> None:
    """Re-execute this process as ``command`` (``code.command``: the code on disk, a
    ``--resume-fd``); returns only if the exec failed (signals unblocked again)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        os.execv(command[0], command)
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        raise


def unblock_signals() -> None:
    """In the new image, once its handlers are installed: what arrived meanwhile is
    delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class Adopted:
    """A worker process the previous image started (our child still, after execve): the
    subset of asyncio.subprocess.Process the supervisor uses, waited on with a pidfd."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        loop = asyncio.get_running_loop()
        self._exited = loop.create_future()
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already: reap it
            self._pidfd = None
            self._reap()
            return
        loop.add_reader(self._pidfd, self._reap)

    def __repr__(self) -> str:
        return f"<Adopted pid={self.pid} returncode={self.returncode}>"

    def _reap(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        try:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped elsewhere: its status is lost
            self.returncode = -1
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
