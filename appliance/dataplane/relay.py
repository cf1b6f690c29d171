"""The byte relay: the two sockets of a connection and the bytes between them.

A :class:`~appliance.dataplane.tunnel.Tunnel` (a client connection and its backend, and how the
backend is connected) holds an :class:`End` per socket. Invariants:

- Bytes read from one end are written to the other unchanged and in order.
- Backpressure: what the destination does not take at once is kept (at most one
  read, 256 KiB) and the source is not read again until it has gone; so memory per
  connection is bounded however slow either reader is.
- Half-close: EOF read from one end becomes ``shutdown(SHUT_WR)`` on the other once
  everything before it is written; the other direction stays open. When both
  directions have ended, both sockets are closed.
- An error (reset) on one end is passed on as a reset of the other, after what was read
  before it is delivered (bounded: see Tunnel.fail); an orderly EOF stays an EOF.
- Data the client sends while the backend connects is kept, up to ``EARLY_LIMIT``
  (then the client is not read until the backend is there).

Bulk transfers: once one direction has carried ``splice_after`` bytes (and nothing is
pending), it moves through a pipe with ``splice()``: the kernel moves the pages, Python
sees one event per pipeful (1 MiB, or 256 KiB once the process has its share of 1 MiB
pipes; see engine.BIG_PIPE_SIZE). Same invariants, with one pipeful in flight instead of
one read; short connections never pay for a pipe.

The sockets live in the :class:`~appliance.dataplane.engine.Engine`'s epoll set.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING

from .engine import BIG_PIPE_SIZE, READ_SIZE
from .epoll import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP

if TYPE_CHECKING:
    from .tunnel import Tunnel

READABLE = EPOLLIN | EPOLLRDHUP  # RDHUP: the peer's FIN has arrived (see End.read)
# Bytes a client may send before its backend is connected; past this it is not read until
# the backend is there. Most first requests fit.
EARLY_LIMIT = 64 * 1024

NEVER = float("inf")
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
MIN_PIPE_SIZE = 64 * 1024  # the default; smaller pipes are not worth a splice
SPLICE_EVENT_BYTES = 4 << 20  # what one event may splice (then other connections' events)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Every read and write says "do not wait" itself, so an accepted socket needs no call to
# make it non-blocking (one system call less per connection). Only splice() needs the
# socket's own flag: start_splice sets it, once per bulk connection.
_DONTWAIT = socket.MSG_DONTWAIT


class End:
    """One socket of a tunnel. What it reads goes to ``peer``; ``out`` and ``piped`` hold
    what was meant for *this* socket but not yet taken."""

    __slots__ = ("tunnel", "engine", "sock", "fd", "peer", "events", "reading", "nbytes", "eof",
                 "shut", "out", "early", "piped", "splice_at", "pipe_r", "pipe_w", "pipe_size",
                 "connecting")

    def __init__(self, tunnel: Tunnel, sock) -> None:
        self.tunnel = tunnel
        self.engine = tunnel.engine
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: End | None = None
        self.events = 0  # what the epoll set watches for now
        self.reading = True  # we want to read (no EOF yet, peer not backed up)
        self.nbytes = 0  # bytes read from this socket
        self.eof = False  # EOF read from this socket
        self.shut = False  # we shut down this socket's write side
        self.out = None  # bytes for this socket it did not take yet
        self.early = None  # bytes read from this socket before the peer existed
        self.piped = 0  # bytes for this socket waiting in the peer's pipe
        self.splice_at = NEVER  # after this many bytes read, read through a pipe
        self.pipe_r = self.pipe_w = -1
        self.pipe_size = 0
        self.connecting = False  # a backend socket whose connect is in progress

    def __repr__(self) -> str:
        state = "closed" if self.sock is None else ("eof" if self.eof else "open")
        return f"<End {state} read={self.nbytes}B>"

    def update(self) -> None:
        """Watch for what this end needs now: readable while reading, writable while
        something is pending (or the connect is in progress)."""
        if self.sock is None:
            return  # closed: out of the set already
        new = (READABLE if self.reading else 0) | \
            (EPOLLOUT if self.out is not None or self.piped or self.connecting else 0)
        old = self.events
        if new != old:
            if not old:
                self.engine.register(self.fd, new, self)
            elif not new:
                self.engine.unregister(self.fd)
            else:
                self.engine.modify(self.fd, new)
            self.events = new

    def ready(self, events: int) -> None:
        tunnel = self.tunnel
        if self.connecting:
            return tunnel.connect_done(self, events)
        if events & EPOLLOUT:
            self.flush()
            if self.sock is None:
                return
        if self.reading and events & (EPOLLIN | EPOLLERR | EPOLLHUP):
            if self.pipe_w >= 0:
                self.splice_read()
            else:
                self.read(events)
        elif events & (EPOLLERR | EPOLLHUP) and not events & EPOLLOUT:
            tunnel.fail(self)  # an error reported while we neither read nor write: do not spin

    def crashed(self) -> None:
        """ready() raised (a bug): reset the connection (the engine logged it)."""
        if self.tunnel is not None:  # (None: closed already)
            self.tunnel.abort("error")

    # -- reading -------------------------------------------------------------------

    def take(self, call, *args) -> int:
        """Read with ``call(*args)``: the bytes read (counted), or 0 when there is nothing
        more to do now (it would block, EOF was passed on, or an error closed the tunnel)."""
        try:
            n = call(*args)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.tunnel.fail(self)
            return 0
        if not n:
            self.got_eof()
            return 0
        self.nbytes += n
        return n

    def read(self, events: int, size: int = READ_SIZE) -> None:
        # (recv and send written out, not through take() and write(): this is the path of
        # almost every event)
        engine = self.engine
        try:
            n = self.sock.recv_into(engine.buffer, size, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.tunnel.fail(self)
        if not n:
            return self.got_eof()
        self.nbytes += n
        peer = self.peer
        if peer is None:  # the backend is not connected yet: keep this (bounded)
            data = bytes(engine.view[:n])
            self.early = data if self.early is None else self.early + data
            if len(self.early) >= EARLY_LIMIT:
                self.reading = False
                self.update()
            return
        data = engine.view[:n]
        try:
            sent = peer.sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self.tunnel.fail(peer)
        if sent < n:
            peer.out = bytes(data[sent:])  # off the shared buffer
            peer.hold()
        if events & EPOLLRDHUP and n < size and not events & EPOLLERR:
            # The FIN had arrived before this read, and a read shorter than asked for took
            # everything queued before it: this is the EOF, without a read that returns 0.
            self.got_eof()
        elif self.nbytes >= self.splice_at and peer.out is None:
            self.start_splice()

    def write(self, data) -> int:
        """As much of ``data`` as the socket takes now: bytes sent, or -1 if it failed (and
        the tunnel is closed)."""
        try:
            return self.sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self.tunnel.fail(self)
            return -1

    def hold(self) -> None:
        """Something is pending for this socket: watch for writable, stop reading the peer."""
        peer = self.peer
        if peer.reading:
            peer.reading = False
            peer.update()
        self.update()

    def got_eof(self) -> None:
        """EOF from this socket: pass it on once what we read before it is written."""
        self.eof = True
        self.reading = False
        peer = self.peer
        if peer is None or peer.sock is None:
            return self.update()  # the connect passes it on (or the tunnel is closing)
        if peer.out is None and not peer.piped:
            if self.shut:  # the other direction is done too: close both (which also takes
                return self.tunnel.close()  # them out of the epoll set)
            self.update()
            peer.shutdown()
        else:
            self.update()

    def shutdown(self) -> None:
        """Our peer's EOF, passed on: shut down our write side; close both if that was the
        last open direction."""
        if self.shut or self.sock is None:
            return
        self.shut = True
        if self.peer.shut:
            return self.tunnel.close()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.tunnel.fail(self)

    # -- writing what is pending ---------------------------------------------------------

    def flush(self) -> None:
        if self.piped:
            return self.flush_pipe()
        out = self.out
        if out is None:
            return self.update()
        sent = self.write(out)
        if sent < 0:
            return
        if sent < len(out):
            if sent:
                self.out = memoryview(out)[sent:]  # no copy of the rest
            return self.hold()
        self.out = None
        self.drained()

    def drained(self) -> None:
        """Nothing pending for this socket any more: read the peer again, or pass its EOF
        (or, when the peer was reset, pass that on: Tunnel.fail)."""
        self.update()
        if self.tunnel.survivor is self:
            return self.tunnel.delivered()
        peer = self.peer
        if peer.eof:
            self.shutdown()
        elif not peer.reading:
            peer.reading = True
            peer.update()

    # -- splice ------------------------------------------------------------------------

    def start_splice(self) -> None:
        """Read this socket through a pipe from now on; if fds run out, stay as we are."""
        try:
            pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.splice_at = NEVER
            return
        size = self.engine.size_pipe(pipe_w)
        if size < MIN_PIPE_SIZE:
            # Past the user's pipe quota a pipe holds a few KiB: an event per few KiB costs
            # more than recv and send.
            os.close(pipe_r)
            os.close(pipe_w)
            self.splice_at = NEVER
            return
        self.pipe_size = size
        self.pipe_r, self.pipe_w = pipe_r, pipe_w
        self.sock.setblocking(False)  # splice() waits on a blocking socket whatever its flags
        self.peer.sock.setblocking(False)

    def splice_read(self) -> None:
        """Socket -> pipe -> peer, again and again until the socket has nothing (bounded):
        what arrives while we move a pipeful goes in the same event, not the next wakeup."""
        peer = self.peer
        moved = 0
        while moved < SPLICE_EVENT_BYTES:
            n = self.take(os.splice, self.fd, self.pipe_w, BIG_PIPE_SIZE, None, None, SPLICE_FLAGS)
            if not n:
                return
            moved += n
            peer.piped += n
            if not peer.flush_pipe():
                return  # peer full: we stopped reading until it takes more

    def flush_pipe(self) -> bool:
        """Move what waits in the peer's pipe into this socket; True if it all went."""
        src = self.peer
        while self.piped:
            try:
                self.piped -= os.splice(src.pipe_r, self.fd, self.piped, flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):  # full: read no more meanwhile
                self.hold()
                return False
            except OSError:
                self.tunnel.fail(self)
                return False
        self.drained()
        return self.sock is not None  # (drained() may have closed the tunnel)

    def detach(self) -> None:
        """Watch this socket no more (it failed); its pipe, if any, stays for the peer."""
        self.reading = False
        self.out, self.piped = None, 0
        self.update()

    def reset(self) -> None:
        """Make close() send a reset (RST), not an orderly FIN."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            except OSError:
                pass

    def unsent(self) -> int:
        """Bytes still in this socket's send queue (not yet acknowledged by the peer)."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return 0

    def close(self) -> None:
        if self.sock is None:
            return
        self.engine.forget(self.fd, bool(self.events))  # close() takes it out of the set
        self.events = 0
        self.sock.close()
        self.sock = None
        if self.pipe_r >= 0:
            os.close(self.pipe_r)
            os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
            self.engine.pipe_closed(self.pipe_size)
        # No links back (end <-> tunnel, end <-> end): reference counting frees a closed
        # connection at once, not Python's cyclic collector some time later (NOTES,
        # Performance, step 20). A closed end ignores whatever still calls it.
        self.tunnel = self.peer = None


PACE_CHUNK = 16 * 1024  # a paced end, out of tokens, waits until it may read this much


def pace_burst(rate: int) -> float:
    """What a paced end may read at once: 1/20 s worth, or 16 KiB if more (at most the rate)."""
    return max(rate / 20, min(rate, PACE_CHUNK))


class PacedEnd(End):
    """An :class:`End` read no faster than its tunnel's ``pace`` (bytes/s: the app's
    BytesPerSecond), for each direction separately: a token bucket of ``pace_burst``
    bytes. Out of tokens it stops reading, as for backpressure: the kernel's buffers fill
    and TCP tells the sender to wait, so nothing piles up here; a timer reads again once
    the bucket holds a chunk. (A paced tunnel never splices: a pipeful would overshoot.)"""

    __slots__ = ("tokens", "stamp", "timer")

    def __init__(self, tunnel: Tunnel, sock) -> None:
        super().__init__(tunnel, sock)
        self.tokens = pace_burst(tunnel.pace)
        self.stamp = time.monotonic()
        self.timer = None

    def read(self, events: int, size: int = READ_SIZE) -> None:
        rate = self.tunnel.pace
        now = time.monotonic()
        tokens = min(pace_burst(rate), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if tokens < 1:
            self.tokens = tokens
            return self.pause(rate)
        before = self.nbytes
        End.read(self, events, int(min(tokens, size)))
        self.tokens = tokens - (self.nbytes - before)
        if self.tokens < 1 and self.reading and self.sock is not None:
            self.pause(rate)

    def pause(self, rate: int) -> None:
        self.reading = False
        self.update()
        if self.timer is None:
            wait_s = (min(pace_burst(rate), PACE_CHUNK) - self.tokens) / rate
            self.timer = self.engine.loop.call_later(wait_s, self.unpause)

    def unpause(self) -> None:
        """The bucket has a chunk again: read, unless something else holds reading back
        (EOF, the peer's backlog: the peer's drained() resumes us then)."""
        self.timer = None
        if self.sock is None or self.eof or self.reading:
            return
        peer = self.peer
        if peer is None:
            if self.early is not None and len(self.early) >= EARLY_LIMIT:
                return  # the connect resumes reading
        elif peer.out is not None or peer.piped or self.tunnel.survivor is not None:
            return
        self.reading = True
        self.update()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().close()
