"""The data plane's event engine: one epoll set holding every socket we relay.

Why not asyncio transports: a connection through two uvloop transports costs about
40 us of interpreter time (a Task and futures for the connect, two transports with
their handles, protocol callbacks), more than HAProxy spends on the whole
connection. Here one epoll set (level-triggered) holds the listeners and every client
and backend socket; each event is handled with one plain socket call that never
waits (``accept`` here; ``connect``, ``recv_into``, ``send``, ``splice`` in
:mod:`appliance.dataplane.relay` and :mod:`appliance.dataplane.tunnel`).

That epoll set is also the event loop's: with :class:`~appliance.dataplane.loop.EngineSelector`
(the default; ``loop.py`` keeps everything that touches asyncio's internals) the
asyncio loop's one ``epoll_wait`` per wakeup brings the relay's events, handled right
in the selector, and the loop's own (control socket, signals, timers' wakeups); one
system call and no loop iteration per wakeup while only connections are busy. On
another loop (uvloop) the loop watches the epoll set as one more file descriptor.

A socket that wants no event is taken out of the set, not left in it with an empty
mask: epoll reports hang-ups and errors regardless of the mask, and a level-triggered
report nobody acts on would spin.

The engine knows sockets and handlers, not connections: each fd in the set has a
:class:`Handler` (a relay's :class:`~appliance.dataplane.relay.End`, a :class:`Listener`),
and a backend connect that outlives its deadline is handed to ``on_timeout``.
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import logging
import os
import select
import socket
from typing import Callable, Hashable, Protocol

from ..logs import RateLimited
from .epoll import EPOLLIN, MAX_EVENTS
from .loop import adopt

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024  # the shared read buffer: one recv_into
# Pipes for spliced directions (appliance.dataplane.relay). The larger the pipe, the more one splice()
# moves: 1 MiB (fs.pipe-max-size, the most an unprivileged process may ask for) takes half
# the system calls per GB that 256 KiB does. But every pipe's size counts against the user's
# quota (fs.pipe-user-pages-soft, 64 MiB by default), so a process sizes only its first few
# pipes at 1 MiB (BIG_PIPE_SHARE of the quota) and the rest at 256 KiB.
BIG_PIPE_SIZE = 1 << 20
PIPE_SIZE = 256 * 1024
BIG_PIPE_SHARE = 8  # a process's 1 MiB pipes take at most 1/8 of the user's pipe quota
# Accepts per listener event, so one busy port cannot starve the others: under a flood on
# one app's listener, another app's connection waits for at most this many of the flood's
ACCEPT_BATCH = 16
ACCEPT_PAUSE_S = 1.0  # out of fds or memory: stop accepting on that listener for this long

RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_Socket = _socket.socket  # the C type: no Python-level __init__ per connection
_STREAM = socket.SOCK_STREAM
_TCP, _NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY


def big_pipe_budget(quota_file: str = "/proc/sys/fs/pipe-user-pages-soft") -> int:
    """How many 1 MiB pipes one process may hold: its share of the user's pipe quota (no
    quota: no limit that matters)."""
    try:
        with open(quota_file) as f:
            pages = int(f.read())
    except (OSError, ValueError):
        pages = 16384  # the kernel's default
    if not pages:
        return 1 << 30
    return pages * os.sysconf("SC_PAGE_SIZE") // (BIG_PIPE_SHARE * BIG_PIPE_SIZE)


def _set_pipe_size(fd: int, size: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:  # over the user's pipe quota (fs.pipe-user-pages-soft)
        return False
    return True


class Handler(Protocol):
    """What the engine calls for an fd in its set."""

    def ready(self, events: int) -> None:
        """The fd has ``events`` (epoll's bits)."""

    def crashed(self) -> None:
        """``ready`` raised (a bug, logged): end what it serves; the engine goes on."""


class Engine:
    """The epoll set, the listeners in it, and the deadlines of backend connects.

    ``on_timeout(key)`` runs for a connect started with :meth:`connect_started` (``key``:
    whoever connects, a :class:`~appliance.dataplane.tunnel.Tunnel`) and not ended with
    :meth:`connect_ended` within ``connect_timeout_s``."""

    def __init__(self, loop, connect_timeout_s: float,
                 on_timeout: Callable[[Hashable], None]) -> None:
        self.loop = loop
        self.handlers: dict[int, Handler] = {}  # fd -> its handler
        self.buffer = bytearray(READ_SIZE)
        self.view = memoryview(self.buffer)
        self.connect_timeout_s = connect_timeout_s
        self.on_timeout = on_timeout
        self.big_pipes = big_pipe_budget()  # 1 MiB pipes this process may still size
        # Tunnels connecting -> their attempt's deadline. Every attempt has the same timeout
        # and a tunnel's previous attempt has always ended (connect_ended) before its next
        # starts, so insertion order is deadline order: one timer, for the oldest, serves
        # them all.
        self.connecting: dict[Hashable, float] = {}
        self._timer = None
        self._limited = RateLimited(log)
        # fds closed while a batch of events is handled: the batch's later events for them
        # are stale (and the number may already belong to a new socket)
        self.closed: set[int] = set()
        self._selector = adopt(loop, self)
        if self._selector is not None:  # the loop's own wait is ours: one epoll_wait per wakeup
            self.epoll = self._selector.epoll
        else:  # (uvloop, or any other loop) our epoll set is one more fd the loop watches
            self.epoll = select.epoll()
            loop.add_reader(self.epoll.fileno(), self._ready)

    # -- the epoll set: every socket of ours goes in and out through these --------------

    def register(self, fd: int, events: int, handler: Handler) -> None:
        """Put ``fd`` in the set for ``events``; ``handler.ready(events)`` runs on each."""
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self.epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        """Take ``fd`` out of the set (it stays open)."""
        self.epoll.unregister(fd)
        del self.handlers[fd]

    def forget(self, fd: int, registered: bool) -> None:
        """``fd`` is being closed (close() takes it out of the set by itself): drop its
        handler, and any event for it still in the batch being handled (the number may
        be reused at once by a new socket)."""
        if registered:
            del self.handlers[fd]
        self.closed.add(fd)

    # -- pipes ---------------------------------------------------------------------

    def size_pipe(self, fd: int) -> int:
        """Grow a new pipe for a spliced direction: 1 MiB while this process has its share
        of those left, else 256 KiB; past the user's quota it keeps the size it was made
        with. Returns the size it has; give it back with :meth:`pipe_closed`."""
        if self.big_pipes > 0 and _set_pipe_size(fd, BIG_PIPE_SIZE):
            self.big_pipes -= 1
            return BIG_PIPE_SIZE
        if _set_pipe_size(fd, PIPE_SIZE):
            return PIPE_SIZE
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)

    def pipe_closed(self, size: int) -> None:
        if size == BIG_PIPE_SIZE:
            self.big_pipes += 1

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._selector is not None:
            self._selector.release()
            return
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()

    def _ready(self) -> None:
        self.dispatch(self.epoll.poll(0, MAX_EVENTS))

    def dispatch(self, fd_events) -> list:
        """Run the handler of each (fd, events); return those that are not ours."""
        handlers, closed = self.handlers, self.closed
        closed.clear()
        others = []
        for fd, events in fd_events:
            if closed and fd in closed:
                continue
            handler = handlers.get(fd)
            if handler is not None:
                try:
                    handler.ready(events)
                except Exception:  # a bug must not take the whole data plane down
                    self._limited.error("relay", "unexpected error on fd %d; its connection is "
                                        "closed", fd, exc_info=True)
                    handler.crashed()
            else:  # the event loop's (or one taken out by an earlier event in this batch)
                others.append((fd, events))
        return others

    # -- listeners -----------------------------------------------------------------

    def listen(self, sock: socket.socket, port: int | None, on_accept) -> Listener:
        sock.setblocking(False)
        sock.setsockopt(_TCP, _NODELAY, 1)  # accepted sockets inherit it: no call per connection
        listener = Listener(self, sock, port, on_accept)
        listener.resume()
        return listener

    # -- connect deadlines ----------------------------------------------------------

    def connect_started(self, key: Hashable) -> float:
        """``key``'s connect starts now; returns the time (the loop's clock)."""
        now = self.loop.time()
        self.connecting[key] = now + self.connect_timeout_s  # at the end: deadline order
        if self._timer is None:
            self._timer = self.loop.call_at(now + self.connect_timeout_s, self._expire)
        return now

    def connect_ended(self, key: Hashable) -> None:
        self.connecting.pop(key, None)

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        expired = []
        for key, deadline in self.connecting.items():
            if deadline > now:
                break
            expired.append(key)
        for key in expired:
            if self.connecting.pop(key, None) is not None:
                self.on_timeout(key)
        if self.connecting and self._timer is None:
            self._timer = self.loop.call_at(next(iter(self.connecting.values())), self._expire)


class Listener:
    """A listening socket in the epoll set (its :class:`Handler`); ``on_accept(sock, addr,
    port)`` per connection."""

    __slots__ = ("engine", "sock", "fd", "port", "on_accept", "active", "_pause")

    def __init__(self, engine: Engine, sock: socket.socket, port: int | None, on_accept) -> None:
        self.engine, self.sock, self.fd, self.port = engine, sock, sock.fileno(), port
        self.on_accept = on_accept
        self.active = False
        self._pause = None

    def resume(self) -> None:
        self._pause = None
        if not self.active and self.sock.fileno() >= 0:
            self.active = True
            self.engine.register(self.fd, EPOLLIN, self)

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.engine.unregister(self.fd)
        if self._pause is not None:
            self._pause.cancel()
            self._pause = None

    def close(self) -> None:
        """Stop accepting and close our socket (a handed-in one stays open elsewhere)."""
        self.stop()
        self.sock.close()

    def crashed(self) -> None:
        pass  # (logged; the listener stays: the next event accepts again)

    def ready(self, events: int) -> None:
        accept, on_accept, port = self.sock._accept, self.on_accept, self.port
        family = self.sock.family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:  # the backlog keeps them; try again later
                    self.engine._limited.error(
                        f"accept:{e.errno}", "accept() on %s out of system resources: %s; "
                        "not accepting for %gs", self.sock.getsockname(), e.strerror,
                        ACCEPT_PAUSE_S)
                    self.stop()
                    self._pause = self.engine.loop.call_later(ACCEPT_PAUSE_S, self.resume)
                return  # ECONNABORTED and the like: the next event brings the rest
            # Left blocking: the relay's reads and writes say MSG_DONTWAIT themselves.
            pause_s = on_accept(_Socket(family, _STREAM, 0, fd), addr, port)
            if pause_s:  # this port's app takes no new connection for a while (its rate):
                self.stop()  # the rest wait in the backlog, then the kernel holds off SYNs
                self._pause = self.engine.loop.call_later(pause_s, self.resume)
                return
