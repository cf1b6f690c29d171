"""The byte relay between a client and a backend: two asyncio Protocols, one per side.

Callback order for one side (asyncio guarantees it):
``connection_made`` -> ``data_received``* -> ``eof_received``? -> ``connection_lost``.

Invariants:
- Bytes read from one side are written to the other unchanged and in order.
- Backpressure: when a side's write buffer passes its high-water mark asyncio calls
  that side's ``pause_writing``; we stop *reading* the peer until ``resume_writing``.
  So memory per connection is bounded by two transport write buffers, however slow
  either reader is.
- Half-close: EOF read from one side becomes ``write_eof`` (FIN) on the other, and
  the connection stays open in the other direction. Once both directions have seen
  EOF both transports are closed (after their buffers drain).
- A side that is lost with an error (reset) aborts the other; a side that is lost
  cleanly closes the other after its buffer drains.

Bulk transfers: once one direction has carried ``splice_after`` bytes (and the peer's
write buffer is empty), that direction leaves the transports and moves through a pipe
with ``splice()``: the kernel moves the pages, Python only sees one callback per pipeful
(:class:`Splice`). The transports stay in charge of the other direction and of closing;
the same invariants hold (order, backpressure through the pipe, EOF -> write_eof,
error -> abort). Short connections never pay for a pipe.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time

# Bytes a side may read before its peer exists (the client's first request while the
# backend connects); past this we stop reading it until link(). Most first requests fit,
# so most connections never pause and resume (two epoll changes saved per connection).
EARLY_LIMIT = 64 * 1024


class Side(asyncio.Protocol):
    """One end of a relayed connection. ``peer`` is the other end, set by :meth:`link`."""

    __slots__ = ("transport", "peer", "eof", "closed", "nbytes", "tunnel", "early", "splice_at",
                 "splice", "fd")

    def __init__(self, tunnel: Tunnel | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False  # we read EOF from this side
        self.closed = False  # connection_lost has run
        self.nbytes = 0  # bytes read from this side
        self.tunnel = tunnel
        self.early: list[bytes] = []  # read before the peer existed; flushed by link()
        self.splice_at = NEVER  # bytes read after which this side's reads are spliced
        self.splice: Splice | None = None  # the pipe carrying what we read, once spliced
        self.fd = -1  # our dup of the socket for splice (the transport owns its fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("eof" if self.eof else "open")
        return f"<{type(self).__name__} {state} read={self.nbytes}B>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        if self.peer is None:  # backend not connected yet: hold this (bounded)
            self.early.append(data)
            if self.nbytes >= EARLY_LIMIT:
                self.transport.pause_reading()
            return
        peer = self.peer.transport
        peer.write(data)
        if self.nbytes >= self.splice_at and not peer.get_write_buffer_size():
            Splice.start(self, self.peer)

    def eof_received(self) -> bool:
        return self.got_eof()

    def got_eof(self) -> bool:
        """EOF read from this side (by the transport or by a splice)."""
        self.eof = True
        peer = self.peer
        if peer is None:
            return True  # link() passes the EOF on
        if peer.eof:  # both directions done
            self.transport.close()
            peer.transport.close()
            return False
        if not peer.closed:
            peer.transport.write_eof()
        return True  # keep our write direction open

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.fd >= 0:
            self.unsplice()
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        if self.tunnel is not None:
            self.tunnel.side_lost(self, exc)

    def unsplice(self) -> None:
        """Stop both directions' pipes through this side and close our dup of its socket."""
        for splice in (self.splice, self.peer.splice if self.peer else None):
            if splice is not None:
                splice.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def dup_fd(self) -> int:
        if self.fd < 0:
            self.fd = os.dup(self.transport.get_extra_info("socket").fileno())
        return self.fd

    # Backpressure: our write buffer is full, so stop reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.resume_reading()


class Tunnel:
    """A client connection and, once connected, its backend; the unit the proxy tracks."""

    __slots__ = ("client", "backend", "app", "port", "target", "attempts", "started",
                 "connecting", "on_close", "end", "seen_bytes", "seen_at", "splice_after")

    def __init__(self, client: Side, app: str, port: int, on_close, splice_after: int = 0) -> None:
        self.client = client
        client.tunnel = self
        self.backend: Side | None = None
        self.app = app
        self.port = port
        self.target = None
        self.attempts = 0
        self.started = time.monotonic()
        self.connecting: asyncio.Task | None = None
        self.on_close = on_close  # called once, when both sides are gone
        self.end: str | None = None  # why we ended it, if we did ("idle", "shutdown", ...)
        self.seen_bytes = 0  # for the idle sweep: bytes moved when last looked at ...
        self.seen_at = self.started  # ... and since when
        self.splice_after = splice_after  # 0: never splice

    def __repr__(self) -> str:
        return (f"<Tunnel app={self.app} port={self.port} target={self.target} "
                f"client={self.client!r} backend={self.backend!r}>")

    def link(self, backend: Side) -> None:
        """Join a connected backend to the client and start relaying both ways.

        Either side may already have read data, read EOF or gone away while the
        backend was connecting (``Side.early``, ``eof``, ``closed``): pass all of it on.
        """
        client = self.client
        self.backend = backend
        backend.peer, client.peer = client, backend
        if self.splice_after:
            client.splice_at = backend.splice_at = self.splice_after
        for side in (client, backend):
            if side.early:
                if not side.peer.closed:
                    side.peer.transport.writelines(side.early)
                side.early = []
        if client.eof and backend.eof:
            client.transport.close()
            backend.transport.close()
            return
        for side in (client, backend):
            peer = side.peer
            if side.closed:
                if not peer.closed:
                    peer.transport.close()
            elif side.eof:
                if not peer.closed:
                    peer.transport.write_eof()
            elif not side.transport.is_reading():
                side.transport.resume_reading()

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if side is self.client and self.connecting is not None:
            self.connecting.cancel()
        if self.client.closed and (self.backend is None or self.backend.closed):
            if self.on_close is not None:
                on_close, self.on_close = self.on_close, None
                on_close(self, exc)

    def close(self, abort: bool = False) -> None:
        for side in (self.client, self.backend):
            if side is None or side.transport is None or side.closed:
                continue
            if abort:
                side.transport.abort()
            else:
                side.transport.close()


class Splice:
    """One direction of a tunnel moved by the kernel: src socket -> pipe -> dst socket.

    Readiness comes from the loop (``add_reader``/``add_writer`` on our dups of the
    sockets, since the transports own theirs). Read from src only while the pipe is
    empty; when dst cannot take the pipe's contents, stop reading src and wait for dst
    to be writable: at most one pipeful in flight, so backpressure reaches the sender.
    """

    __slots__ = ("src", "dst", "loop", "rfd", "wfd", "pipe_r", "pipe_w", "pending", "eof",
                 "reading", "writing")

    def __init__(self, src: Side, dst: Side, rfd: int, wfd: int, pipe_r: int, pipe_w: int):
        self.src, self.dst, self.rfd, self.wfd = src, dst, rfd, wfd
        self.pipe_r, self.pipe_w = pipe_r, pipe_w
        self.loop = asyncio.get_running_loop()
        self.pending = 0  # bytes in the pipe
        self.eof = False
        self.reading, self.writing = True, False
        self.loop.add_reader(rfd, self._readable)

    @classmethod
    def start(cls, src: Side, dst: Side) -> None:
        """Move src -> dst through a pipe from now on; if fds run out, stay on transports."""
        try:
            rfd, wfd = src.dup_fd(), dst.dup_fd()
            pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            src.splice_at = NEVER  # out of fds: keep relaying through the transports
            return
        try:
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the user's pipe quota (fs.pipe-user-pages-soft): a small
            if fcntl.fcntl(pipe_w, fcntl.F_GETPIPE_SZ) < MIN_PIPE_SIZE:  # pipe costs a
                os.close(pipe_r)  # callback per few KiB: the transports do better
                os.close(pipe_w)
                src.splice_at = NEVER
                return
        src.transport.pause_reading()  # the transport no longer reads src: we do
        src.splice = cls(src, dst, rfd, wfd, pipe_r, pipe_w)

    def _readable(self) -> None:
        if self.pipe_r < 0:  # stopped by a callback earlier in this loop iteration
            return
        try:
            n = os.splice(self.rfd, self.pipe_w, PIPE_SIZE, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            return self._fail(e)
        if n == 0:
            self.eof = True
            self._stop_reading()
            return self._flush()
        self.src.nbytes += n
        self.pending += n
        self._flush()

    def _flush(self) -> None:
        if self.pipe_r < 0:
            return
        while self.pending:
            try:
                self.pending -= os.splice(self.pipe_r, self.wfd, self.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:  # dst is full: wait for it, read no more meanwhile
                self._stop_reading()
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(self.wfd, self._flush)
                return
            except OSError as e:
                return self._fail(e)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.wfd)
        if self.eof:  # all passed on: the EOF goes too (or, if dst said EOF too, both close)
            self.stop()
            self.src.got_eof()
        elif not self.reading:
            self.reading = True
            self.loop.add_reader(self.rfd, self._readable)

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.rfd)

    def _fail(self, exc: OSError) -> None:
        """A reset (or any error) on either socket: abort both, as the transports would."""
        self.stop()
        tunnel = self.src.tunnel or self.dst.tunnel
        if tunnel is not None and tunnel.end is None:
            tunnel.end = "reset"
        for side in (self.src, self.dst):
            if not side.closed:
                side.transport.abort()

    def stop(self) -> None:
        """Unregister and close the pipe (idempotent); the dups are closed by their sides."""
        if self.pipe_r < 0:
            return
        self._stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.wfd)
        os.close(self.pipe_r)
        os.close(self.pipe_w)
        self.pipe_r = self.pipe_w = -1


NEVER = float("inf")
PIPE_SIZE = 256 * 1024  # one callback per this much; pages are allocated only as used
MIN_PIPE_SIZE = 64 * 1024  # the default; smaller pipes are not worth a splice
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
