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
"""

from __future__ import annotations

import asyncio
import time

# Bytes a side may read before its peer exists (the client's first request while the
# backend connects); past this we stop reading it until link(). Most first requests fit,
# so most connections never pause and resume (two epoll changes saved per connection).
EARLY_LIMIT = 64 * 1024


class Side(asyncio.Protocol):
    """One end of a relayed connection. ``peer`` is the other end, set by :meth:`link`."""

    __slots__ = ("transport", "peer", "eof", "closed", "nbytes", "tunnel", "early")

    def __init__(self, tunnel: Tunnel | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.eof = False  # we read EOF from this side
        self.closed = False  # connection_lost has run
        self.nbytes = 0  # bytes read from this side
        self.tunnel = tunnel
        self.early: list[bytes] = []  # read before the peer existed; flushed by link()

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
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
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
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        if self.tunnel is not None:
            self.tunnel.side_lost(self, exc)

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
                 "connecting", "on_close", "end", "seen_bytes", "seen_at")

    def __init__(self, client: Side, app: str, port: int, on_close) -> None:
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
