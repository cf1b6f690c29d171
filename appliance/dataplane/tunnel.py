"""A client connection and its backend: connecting (failover over targets and their
addresses, each attempt bounded), then relaying through two :class:`~appliance.dataplane.relay.End`
objects, then closing both once.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import time

from . import proxy_protocol as pp
from .engine import RESOURCE_ERRNOS, Engine
from .epoll import EPOLLERR, EPOLLHUP
from .relay import NEVER, End, PacedEnd

_Socket = _socket.socket  # the C type: no Python-level __init__ per connection
_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_TCP, _NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
_SOL_SOCKET, _SO_ERROR = socket.SOL_SOCKET, socket.SO_ERROR
HAPPY_EYEBALLS_S = 0.25  # RFC 8305's "Connection Attempt Delay"
ABORT_FLUSH_S = 2.0  # after a reset on one side: the other side's bytes get this long
UNSENT_POLL_S = 0.01  # ... checked this often for having left the send queue


class Tunnel:
    """A client connection and, once connected, its backend; the unit the proxy tracks.

    The connect tries ``order`` (targets, best first) one after another, each attempt
    bounded by the engine's connect timeout; ``owner`` hears how it went
    (``connected(tunnel, seconds)``, ``all_failed(tunnel)``, ``no_resources(tunnel, exc)``
    when we cannot even make a socket) and, once, that the tunnel closed (``closed(tunnel)``).
    """

    __slots__ = ("engine", "owner", "client", "client_addr", "backend", "app", "port", "target",
                 "order", "failures", "health", "resolver", "attempt", "addrs", "addr_i",
                 "racing", "stagger", "attempt_started", "started", "close_reason", "seen_bytes",
                 "seen_at", "logged_at", "splice_after", "done", "keepalive", "survivor",
                 "abort_timer", "proxy_protocol", "load_key", "held", "pace", "stale")

    def __init__(self, engine: Engine, owner, sock, addr, app: str, port: int,
                 splice_after: int = 0, proxy_protocol: str | None = None,
                 pace: int | None = None) -> None:
        self.engine = engine
        self.owner = owner
        self.client_addr = addr
        self.app = app
        self.port = port
        self.target = None  # the target connected to
        self.order = ()  # targets to try, in order
        self.failures: list = []  # (target, reason) for each attempt that failed
        self.health = None
        self.resolver = None  # host-name targets' addresses (appliance.dataplane.resolver)
        self.attempt = 0  # index into order of the target being tried
        self.addrs = ()  # (family, sockaddr) of that target ...
        self.addr_i = 0  # ... and the next one of them to try
        self.racing: list[End] = []  # backend sockets connecting now (one per address tried)
        self.stagger = None  # the timer that starts the next address (Happy Eyeballs)
        self.backend: End | None = None
        self.started = time.monotonic()
        self.attempt_started = 0.0
        self.close_reason: str | None = None  # "idle", "reset", ...; None: closed plainly
        self.seen_bytes = 0  # for the idle sweep: bytes moved when last looked at ...
        self.seen_at = self.started  # ... and since when
        self.logged_at = self.started  # the access log's last line for it (proxy's sweep)
        self.splice_after = splice_after or NEVER
        self.done = False
        self.keepalive = False  # the backend socket has its TCP keepalive (proxy's sweep)
        self.survivor: End | None = None  # after one end failed: the other, being flushed
        self.abort_timer = None
        self.proxy_protocol = proxy_protocol  # "v1"/"v2": a header goes first to the backend
        self.load_key = None  # (app, target) while counted for least-connections (proxy.py)
        self.held = ()  # the limits table's entries it is counted in (proxy.py, limits.py)
        self.stale = False  # its target or port is gone; closed at the app's DrainTimeout
        # BytesPerSecond: each direction read no faster (relay.PacedEnd); never spliced
        self.pace = pace
        if pace is not None:
            self.splice_after = NEVER
            self.client = PacedEnd(self, sock)
            self.client.update()
            return
        self.client = End(self, sock)
        self.client.update()  # read what the client sends while the backend connects

    def __repr__(self) -> str:
        return (f"<Tunnel app={self.app} port={self.port} target={self.target} "
                f"client={self.client!r} backend={self.backend!r}>")

    @property
    def attempts(self) -> int:
        return len(self.failures) + (self.target is not None)

    # -- connecting --------------------------------------------------------------------

    def connect(self, order, health, resolver=None) -> None:
        self.order, self.health, self.resolver = order, health, resolver
        self.attempt = -1
        self.next_target()

    def next_target(self) -> None:
        self.attempt += 1
        if self.attempt >= len(self.order):
            return self.owner.all_failed(self)
        target = self.order[self.attempt]
        self.attempt_started = self.engine.connect_started(self)
        self.addr_i = 0
        if target.addrs is not None:  # an IP literal: nothing to resolve
            self.addrs = target.addrs
            return self.next_address()
        # A host name: its addresses as the resolver keeps them (never a lookup here).
        name = self.resolver.names.get(target.host) if self.resolver is not None else None
        if name is None:
            return self.attempt_failed("dns")
        if name.addrs:
            self.addrs = name.sockaddrs(target.port)
            return self.next_address()
        if name.state == "pending":  # never answered: wait for it, within this attempt's timeout
            attempt = self.attempt
            name.waiters.append(lambda name: self.resolved(name, attempt))
            return
        self.attempt_failed("dns")

    def resolved(self, name, attempt: int) -> None:
        """The first answer for a name this tunnel waits on (``attempt`` of its order)."""
        if attempt != self.attempt or self.done:
            return  # timed out meanwhile (or the client went away)
        if not name.addrs:
            return self.attempt_failed("dns")
        self.addrs = name.sockaddrs(self.order[attempt].port)
        self.next_address()

    def next_address(self, reason: str = "") -> None:
        """Connect to the next address of the current target (a name may have several).

        Happy Eyeballs (RFC 8305): if the target has more addresses, the next one starts
        HAPPY_EYEBALLS_S later while this one is still pending, or at once if it fails;
        the first to connect wins and the others are closed. All of them share the
        target's connect timeout."""
        addrs = self.addrs
        self.stagger = None
        while self.addr_i < len(addrs):
            family, sockaddr = addrs[self.addr_i]
            self.addr_i += 1
            try:
                sock = _Socket(family, _NONBLOCK)
            except OSError as e:
                if e.errno in RESOURCE_ERRNOS:  # our problem, not the target's
                    return self.owner.no_resources(self, e)
                reason = failure_reason(e)
                continue
            err = sock.connect_ex(sockaddr)
            if err == errno.EINPROGRESS or not err:
                end = End(self, sock) if self.pace is None else PacedEnd(self, sock)
                end.connecting = True
                self.racing.append(end)
                end.reading = False
                end.update()  # writable: connected (or failed)
                if self.addr_i < len(addrs):
                    self.stagger = self.engine.loop.call_later(HAPPY_EYEBALLS_S,
                                                               self.next_address)
                return
            sock.close()
            reason = errno_reason(err)
        if not self.racing:
            self.attempt_failed(reason or "no address")

    def connect_done(self, end: End, events: int) -> None:
        # Writable without an error or hang-up reported: connected (no SO_ERROR to ask for).
        if events & (EPOLLERR | EPOLLHUP):
            err = end.sock.getsockopt(_SOL_SOCKET, _SO_ERROR)
            if err:
                self.racing.remove(end)
                end.close()
                if self.addr_i < len(self.addrs):  # the next address now, not at the stagger
                    if self.stagger is not None:
                        self.stagger.cancel()
                    return self.next_address(errno_reason(err))
                if not self.racing:
                    self.attempt_failed(errno_reason(err))
                return
        end.connecting = False
        self.racing.remove(end)
        self.stop_racing()  # the others lost
        engine = self.engine
        engine.connect_ended(self)
        target = self.order[self.attempt]
        health = self.health
        health.seen.add(target)  # (status: a target never reached is "unknown")
        if health.failed:
            health.success(target)
        self.target = target
        self.backend = end
        end.sock.setsockopt(_TCP, _NODELAY, 1)  # (the client's comes from its listener)
        client = self.client
        end.peer, client.peer = client, end
        if self.splice_after is not NEVER:
            client.splice_at = end.splice_at = self.splice_after
        end.reading = True
        self.owner.connected(self, engine.loop.time() - self.attempt_started)
        if self.done:
            return
        early = client.early
        if self.proxy_protocol is not None:  # the header, before any byte of the client's
            try:
                local = client.sock.getsockname()  # in BPF mode: the port it was steered from
            except OSError:
                return self.abort("client-reset")
            head = pp.header(self.proxy_protocol, self.client_addr, local)
            early = head if early is None else head + early
        if early is not None:  # what the client sent meanwhile
            client.early = None
            end.out = early
            end.flush()
        else:
            end.update()
        if self.done:
            return
        if client.eof:
            if end.out is None:
                end.shutdown()
        elif not client.reading and end.out is None:
            client.reading = True
            client.update()

    def attempt_failed(self, reason: str) -> None:
        """The current target did not answer (or has no address left): try the next one."""
        if self.done:
            return
        self.stop_racing()
        self.engine.connect_ended(self)
        target = self.order[self.attempt]
        self.failures.append((target, reason))
        self.health.failure(target, reason)
        self.next_target()

    def connect_timed_out(self) -> None:
        """The engine's ``on_timeout``: the current target's attempt ran out of time."""
        self.attempt_failed("timeout")

    def stop_racing(self) -> None:
        """Close every backend socket still connecting, start no further address."""
        if self.stagger is not None:
            self.stagger.cancel()
            self.stagger = None
        racing, self.racing = self.racing, []
        for end in racing:
            end.close()

    # -- ending --------------------------------------------------------------------------

    def fail(self, end: End | None = None) -> None:
        """An error (a reset, mostly) on ``end``: pass it on as a reset of the other end.

        What was read from ``end`` before the error and not yet written to the other end
        is delivered first, and the other end's send queue left to drain to its peer, for
        at most ABORT_FLUSH_S; then the other end is reset (SO_LINGER 0). So a truncated
        transfer never looks complete to the other side: it ends in a reset, as it would
        have without the proxy."""
        if self.done:
            return
        backend = self.backend
        if end is None or backend is None or end.sock is None:
            if self.close_reason is None:
                self.close_reason = "client-reset" if end is self.client else "reset"
            return self.abort(self.close_reason)
        survivor = backend if end is self.client else self.client
        if self.survivor is not None:  # the survivor failed too: nothing left to deliver
            return self.abort(self.close_reason or "reset")
        if self.close_reason is None:
            self.close_reason = "client-reset" if end is self.client else "backend-reset"
        end.detach()
        self.survivor = survivor
        survivor.reading = False
        if survivor.out is None and not survivor.piped:
            return self.delivered()
        survivor.update()  # writable: the rest goes out, then delivered()
        self.abort_timer = self.engine.loop.call_later(ABORT_FLUSH_S, self.abort,
                                                       self.close_reason)

    def delivered(self) -> None:
        """Everything for the survivor is in its socket: once the kernel has sent it (its
        send queue empty, or the deadline), reset it."""
        if self.done:
            return
        survivor = self.survivor
        if survivor.unsent():
            if self.abort_timer is None:
                self.abort_timer = self.engine.loop.call_later(ABORT_FLUSH_S, self.abort,
                                                               self.close_reason)
            # the kernel gives no event for "acknowledged": look again shortly (bounded by
            # the deadline above)
            self.engine.loop.call_later(UNSENT_POLL_S, self.delivered)
            return
        self.abort(self.close_reason)

    def abort(self, why: str) -> None:
        """End the connection with a reset on both sides (idle timeout, drain deadline,
        relay error, or a reset passed on)."""
        if self.done:
            return
        if self.close_reason is None:
            self.close_reason = why
        self.client.reset()
        if self.backend is not None:
            self.backend.reset()
        self.close()

    def close(self) -> None:
        """Close both sockets now (and stop connecting); tell the owner, once."""
        if self.done:
            return
        self.done = True
        if self.abort_timer is not None:
            self.abort_timer.cancel()
        if self.backend is None:  # still connecting (or waiting for a first DNS answer)
            self.stop_racing()
            self.engine.connect_ended(self)
        self.client.close()
        if self.backend is not None:
            self.backend.close()
        self.owner.closed(self)


def errno_reason(err: int) -> str:
    """failure_reason() for an errno (from connect_ex or SO_ERROR)."""
    return failure_reason(OSError(err, os.strerror(err)))


def failure_reason(exc: BaseException) -> str:
    """A short, stable label for why a connect failed (used in logs and metrics)."""
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__
