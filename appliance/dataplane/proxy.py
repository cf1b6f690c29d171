"""The data plane: accept, route by the port the client dialled, connect, relay.

A :class:`Proxy` holds the current :class:`~appliance.config.Config` and its
listeners. Listeners come in two kinds:

- *owned*: in per-port mode the proxy binds every configured port and opens or
  closes listeners as reloads add or remove ports;
- *handed in*: sockets from systemd, --fd or --listen (BPF mode: one listener); they
  are never closed by a reload, and a connection whose local port is not in the
  config is closed at once.

Either way a connection is routed by its local port, looked up in the config at
accept time, so a reload changes where *new* connections go and never touches the
connections already relayed. The sockets themselves are handled by the relay's
:class:`~appliance.dataplane.engine.Engine` (one epoll set the event loop watches).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import socket
import struct
import time

from ..config import Config, ConfigDiff, diff
from ..logs import RateLimited, count
from ..metrics import NullMetrics
from ..settings import Settings
from . import balancer, limits, listeners
from .checks import apply_changes
from .engine import Engine, Listener
from .resolver import Resolver
from .tunnel import Tunnel

log = logging.getLogger(__name__)
conn_log = logging.getLogger("appliance.connections")
FD_WARNING = 0.9  # of RLIMIT_NOFILE: warn (rate-limited) when connections hold this share
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def peer_text(addr) -> str:
    """A socket address as ``ip:port`` (``[ip]:port`` for IPv6); an IPv4 client of a
    dual-stack socket as IPv4 (``192.0.2.1:80``, not ``::ffff:192.0.2.1``)."""
    if not addr:
        return "-"
    host, port = addr[0], addr[1]
    if ":" not in host:
        return f"{host}:{port}"
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{port}"
    return f"[{host}]:{port}"


def lanes_alone(config: Config) -> dict[str, int]:
    """App name -> its BPF lane (its index in the config mod LANES: what `bpf sync` puts
    in the port map), for the apps that have their lane to themselves."""
    lanes: dict[int, list[str]] = {}
    for index, app in enumerate(config.apps):
        lanes.setdefault(index % listeners.LANES, []).append(app.name)
    return {names[0]: lane for lane, names in lanes.items() if len(names) == 1}


class Proxy:
    def __init__(self, config: Config, settings: Settings | None = None, *,
                 metrics: NullMetrics | None = None) -> None:
        self.config = config
        self.generation = 1
        self.settings = settings or Settings()
        self.metrics = metrics or NullMetrics()
        self.health = balancer.Health(self.settings.eject_s)
        self.tunnels: set[Tunnel] = set()
        self.active: dict[str, int] = {}  # app name -> open connections
        # least-connections apps: (app, target) -> open connections to it (this worker's)
        self.load: dict[tuple[str, object], int] = {}
        self.down: dict[str, set] = {}  # app -> targets its active checks hold down
        self.metrics.track_active(self.active)
        self.metrics.track_ejected(self.ejected)
        self.metrics.configured(config)
        self._routes = config.routes
        self._lane_alone = lanes_alone(config)
        self._owned: dict[int, Listener] = {}  # port -> listener, per-port mode
        self._handed: list[Listener] = []
        self.engine: Engine | None = None
        self.resolver: Resolver | None = None
        self._reload_lock = asyncio.Lock()
        self._drained: asyncio.Future | None = None  # drain() waits on it: no tunnels left
        self._sweeper: asyncio.Task | None = None
        self._limited = RateLimited(log)
        self._conn_log_level = self.settings.conn_log_levelno  # None: the access log is off
        self._sample = self.settings.conn_log_sample  # 1 in this many clean ends is logged
        self._unsampled = 0  # clean ends not logged since the last one that was
        self.pid = os.getpid()  # in the access log: which worker
        self.accepting = False
        self._table: limits.Table | None = None  # (self.table) connection limits' counts

    def __repr__(self) -> str:
        mode = "handed-in" if self._handed else "per-port"
        return (f"<Proxy {mode} generation={self.generation} {self.config.summary()} "
                f"active={len(self.tunnels)}>")

    # -- listeners ---------------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Start accepting: on the given sockets, or on every configured port."""
        self._loop = asyncio.get_running_loop()
        self.engine = Engine(self._loop, self.settings.connect_timeout_s,
                             Tunnel.connect_timed_out)
        self.resolver = Resolver(self._loop, self.settings, self.metrics)
        self.metrics.track_resolver(self.resolver)
        await self.resolve(self.config.names)
        if sockets:
            # The lanes (the supervisor's SO_REUSEPORT groups): `bpf register --spread` fills
            # the BPF program's lanes with them in the order of their ports, and the program
            # queues the apps of index = lane (mod LANES) in each
            lanes = sorted((s for s in sockets
                            if s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)),
                           key=lambda s: s.getsockname()[1])
            for sock in sockets:
                sock.listen(listeners.BACKLOG)  # as for our own (systemd's unit says the same)
                if sock in lanes:
                    accepted = functools.partial(self._accepted, lane=lanes.index(sock))
                    self._handed.append(self._serve(sock, None, accepted))
                else:
                    self._handed.append(self._serve(sock, None))
        else:
            self._open_ports(self.config.ports)
        o = self.settings
        if o.idle_timeout_s > 0 or o.keepalive_idle_s > 0 or self._log_interval_s() > 0:
            self._sweeper = self._loop.create_task(self._sweep_idle())
        self.accepting = True

    def _serve(self, sock: socket.socket, port: int | None, accepted=None) -> Listener:
        o = self.settings  # the client side: accepted sockets inherit the listener's keepalive
        listeners.keepalive(sock, o.keepalive_idle_s, o.keepalive_interval_s, o.keepalive_probes)
        return self.engine.listen(sock, port, accepted or self._accepted)

    def _open_ports(self, ports) -> None:
        """Bind all ``ports`` or none: on failure close what this call opened and raise."""
        opened: dict[int, Listener] = {}
        try:
            for port in sorted(ports):
                try:
                    sock = listeners.bind(port, self.settings.host,
                                          reuse_port=self.settings.workers > 1)
                except OSError as e:
                    raise listeners.ListenerError(
                        f"cannot listen on {self.settings.host or '*'}:{port}: {e.strerror}") from None
                opened[port] = self._serve(sock, port)
        except BaseException:
            for listener in opened.values():
                listener.close()
            raise
        self._owned.update(opened)

    def _close_ports(self, ports) -> None:
        for port in ports:
            listener = self._owned.pop(port, None)
            if listener is not None:
                listener.close()  # stops accepting; established connections are untouched

    @property
    def listening_ports(self) -> list[int]:
        return sorted(self._owned)

    # -- connections ---------------------------------------------------------------

    def _accepted(self, sock, addr, port: int | None, lane: int | None = None) -> float | None:
        """A new connection on ``port`` (None: a handed-in socket's; ``lane``: which, if a
        lane). Returns how long this listener should accept no more (a port, or a lane, of
        the app's own whose app is over its MaxConnectionRate), else None."""
        own = port is not None
        if port is None:  # a handed-in socket: route by the port the client dialled
            port = sock.getsockname()[1]
        app = self._routes.get(port)
        if app is None:
            self._limited.warning(f"noapp:{port}", "connection from %s to port %s: no app has "
                                  "this port; closed", addr, port)
            self.metrics.rejected("", "no_app")
            sock.close()
            return
        held = ()
        if app.limited:  # counted host-wide (limits.py); apps without limits skip all this
            now = time.monotonic()
            reason, held = self.table.admit(app, addr[0], now)
            if reason is not None:
                self._refuse(sock, addr, app, reason)
                # Over the app's rate, its own port stops accepting until a token is due
                # (as HAProxy's "rate-limit sessions"): a flood waits in the kernel's
                # backlog, then the kernel drops its SYNs, instead of costing us an accept
                # and a reset each. (A handed-in socket serves every app: never paused.)
                if reason == "rate" and (own or (lane is not None and
                                                 self._lane_alone.get(app.name) == lane)):
                    return self.table.empty_for(app, now)
                return None
        self.active[app.name] = self.active.get(app.name, 0) + 1
        tunnel = Tunnel(self.engine, self, sock, addr, app.name, port, self.settings.splice_after,
                        app.proxy_protocol, app.bytes_per_second)
        tunnel.held = held
        self.tunnels.add(tunnel)
        self.metrics.accepted(app.name)
        if app.balance == "least-connections":
            tunnel.load_key = ()  # counted once connected (only these apps pay for it)
            load, name = self.load, app.name
            order = self.health.order(app.targets, self.down.get(name),
                                      lambda t: load.get((name, t), 0))
        else:
            order = self.health.order(app.targets, self.down.get(app.name))
        if self.resolver.unsettled:  # some name has no address now: skip it, or try it last
            order = self.resolver.arrange(order)
        tunnel.connect(order, self.health, self.resolver)

    @property
    def table(self) -> limits.Table:
        """The connection limits' counts: the host's (a supervisor's workers share one), or
        this process's own, made when an app first needs it."""
        if self._table is None:
            self._table = limits.Table()
        return self._table

    def share_limits(self, table: limits.Table) -> None:
        """Count against ``table`` (the host's, shared with the other workers)."""
        self._table = table

    def _refuse(self, sock, addr, app, reason: str) -> None:
        """Close a new connection over one of ``app``'s limits (before any backend
        connect) with a reset: counted by app and reason, and a log line at most every 10 s
        per app and reason that says who and why."""
        n = {"max_connections": app.max_connections, "client_connections": app.max_per_client,
             "client_rate": app.rate_per_client, "rate": app.rate}[reason]
        self._limited.warning(f"limit:{app.name}:{reason}", "app %s: connection from %s closed: "
                              "%s", app.name, peer_text(addr),
                              limits.REASONS[reason].format(n=n))
        self.metrics.rejected(app.name, reason)
        try:  # a reset, as HAProxy's "tcp-request connection reject": no TIME_WAIT left here
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
        sock.close()

    def ejected(self) -> dict[tuple[str, str], int]:
        """(app, target) -> 1 while passive health tries the target last, else 0: for
        every target of the config (the ejected-target metric)."""
        ejected = self.health.ejected
        return {(app.name, t.label): int(ejected(t)) for app in self.config.apps
                for t in app.targets}

    # -- what the tunnels tell us (tunnel.Tunnel's owner) ----------------------------------

    def connected(self, tunnel: Tunnel, seconds: float) -> None:
        if tunnel.load_key is not None:  # a least-connections app's
            key = tunnel.load_key = (tunnel.app, tunnel.target)
            self.load[key] = self.load.get(key, 0) + 1
        self.metrics.connected(tunnel.app, tunnel.target, seconds, tunnel.failures)
        if tunnel.failures:
            log.info("app %s port %s: connected to %s after %d attempts (%s)", tunnel.app,
                     tunnel.port, tunnel.target, tunnel.attempts,
                     balancer.describe(tunnel.failures))

    def all_failed(self, tunnel: Tunnel) -> None:
        failures = tunnel.failures
        app = self._routes.get(tunnel.port)
        tried = {target for target, _ in failures}
        skipped = [(t, "dns") for t in (app.targets if app else ()) if t not in tried]
        n = len(failures) + len(skipped)
        self._limited.warning(f"down:{tunnel.app}", "app %s port %s: %s failed "
                              "(%s); closing client", tunnel.app, tunnel.port,
                              "the only target" if n == 1 else f"all {n} targets",
                              balancer.describe(failures + skipped) or "no targets")
        self.metrics.all_down(tunnel.app, failures)
        tunnel.close_reason = "all-targets-down"
        tunnel.close()

    def no_resources(self, tunnel: Tunnel, exc: OSError) -> None:
        """No socket for the backend (out of fds or memory): this connection is closed;
        the targets are not to blame, so their health is untouched."""
        self._limited.error("resources", "cannot connect app %s: out of system resources (%s); "
                            "closing new connections until there are", tunnel.app, exc.strerror)
        self.metrics.rejected(tunnel.app, "resources")
        tunnel.close_reason = "no-resources"
        tunnel.close()

    def closed(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self.active[tunnel.app] -= 1
        if tunnel.held:  # counted against its app's limits
            self._table.release(tunnel.held)
        key = tunnel.load_key
        if key:  # counted when it connected
            left = self.load[key] - 1
            if left:
                self.load[key] = left
            else:
                del self.load[key]
        bytes_in = tunnel.client.nbytes
        bytes_out = tunnel.backend.nbytes if tunnel.backend else 0
        end = tunnel.close_reason or "closed"
        self.metrics.closed(tunnel.app, tunnel.target, bytes_in, bytes_out, end)
        level = self._conn_log_level
        if level is not None and conn_log.isEnabledFor(level):
            if end == "closed" and tunnel.attempts == 1 and self._sample > 1:
                self._unsampled += 1  # a clean end: 1 in conn_log_sample gets its line
                if self._unsampled < self._sample:
                    level = None
                else:
                    self._unsampled = 0
            if level is not None:
                self._access_log(level, tunnel, time.monotonic(), end)
        if not self.tunnels and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _access_log(self, level: int, tunnel: Tunnel, now: float, end: str | None) -> None:
        """The access log's line for ``tunnel``: as it closes (``end`` says why), or while
        it lasts (``end`` None: the bytes so far). The same values go to the journal as
        fields (CONN, CLIENT, APP, PORT, TARGET, BYTES_IN, BYTES_OUT, SECONDS, END,
        ATTEMPTS; the journal adds _PID)."""
        client = peer_text(tunnel.client_addr)
        target = tunnel.target.label if tunnel.target is not None else "-"
        bytes_in = tunnel.client.nbytes
        bytes_out = tunnel.backend.nbytes if tunnel.backend else 0
        secs = now - tunnel.started
        fields = {"CONN": "closed" if end else "open", "CLIENT": client, "APP": tunnel.app,
                  "PORT": tunnel.port, "TARGET": target, "BYTES_IN": bytes_in,
                  "BYTES_OUT": bytes_out, "SECONDS": round(secs, 3),
                  "ATTEMPTS": tunnel.attempts}
        if end:
            fields["END"] = end
            conn_log.log(level, "conn=closed client=%s app=%s port=%s target=%s in=%d out=%d "
                         "secs=%.3f end=%s attempts=%d pid=%d", client, tunnel.app,
                         tunnel.port, target, bytes_in, bytes_out, secs, end, tunnel.attempts,
                         self.pid, extra=fields)
        else:
            conn_log.log(level, "conn=open client=%s app=%s port=%s target=%s in=%d out=%d "
                         "secs=%.0f pid=%d", client, tunnel.app, tunnel.port, target,
                         bytes_in, bytes_out, secs, self.pid, extra=fields)

    def _log_interval_s(self) -> float:
        """How often a connection that lasts gets an access log line (0: never)."""
        level = self._conn_log_level
        if level is None or not conn_log.isEnabledFor(level):
            return 0.0
        return self.settings.conn_log_interval_s

    async def _sweep_idle(self) -> None:
        """Every step: close connections that moved no byte for ``idle_timeout_s``, give
        backend sockets that lived a step their keepalive, and write the access log's line
        for connections open ``conn_log_interval_s`` since their last one.

        Costs nothing per byte and no timer per connection: a tunnel's byte counts are
        compared between sweeps. A backend socket gets keepalive only once its connection
        has lived a step: no system call for the short connections that never need a probe.
        """
        o = self.settings
        idle_s = o.idle_timeout_s
        step_s = min(idle_s / 4, 5.0) if idle_s > 0 else 5.0
        log_every_s = self._log_interval_s()
        if log_every_s > 0:
            step_s = min(step_s, log_every_s)  # a line between 1 and 2 intervals late at most
        keepalive = o.keepalive_idle_s > 0
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        while True:
            await asyncio.sleep(step_s)  # a periodic timer, not a synchronisation
            now = time.monotonic()
            # two fds per connection (more while splicing): near the limit, say so once in
            # a while, before accept() starts failing
            if 2 * len(self.tunnels) >= FD_WARNING * soft:
                self._limited.warning("fds", "%d connections hold about %d of this process's "
                                      "%d file descriptors (LimitNOFILE)", len(self.tunnels),
                                      2 * len(self.tunnels), soft)
            for tunnel in list(self.tunnels):
                backend = tunnel.backend
                if backend is None:
                    continue  # still connecting: the connect timeout applies
                if keepalive and not tunnel.keepalive and backend.sock is not None:
                    tunnel.keepalive = True
                    try:
                        listeners.keepalive(backend.sock, o.keepalive_idle_s,
                                            o.keepalive_interval_s, o.keepalive_probes)
                    except OSError:
                        pass  # closing meanwhile
                if log_every_s > 0 and now - tunnel.logged_at >= log_every_s:
                    tunnel.logged_at = now
                    self._access_log(self._conn_log_level, tunnel, now, None)
                if idle_s <= 0:
                    continue
                moved = tunnel.client.nbytes + backend.nbytes
                if moved != tunnel.seen_bytes:
                    tunnel.seen_bytes, tunnel.seen_at = moved, now
                elif now - tunnel.seen_at >= idle_s:
                    tunnel.abort("idle")  # a reset both ways: not a clean end of stream

    # -- host names ----------------------------------------------------------------------

    async def resolve(self, names) -> None:
        """Have ``names`` (and only those) resolved; wait for first answers, bounded by the
        connect timeout (a name still unanswered is pending: tried last, when it answers)."""
        self.resolver.track(names)
        # bounded well inside a supervisor's reload deadline (workers.RELOAD_TIMEOUT_S)
        pending = await self.resolver.settle(min(self.settings.connect_timeout_s, 15.0))
        if pending:
            log.warning("%d host names not answered within %gs; tried once they are",
                        pending, self.settings.connect_timeout_s)

    # -- reload and shutdown -----------------------------------------------------------

    async def reload(self, new: Config) -> ConfigDiff:
        """Apply ``new``: open added ports, switch routes, close removed ports.

        All or nothing: if an added port cannot be bound, nothing changes and the
        error is raised. Existing connections are never touched.
        """
        async with self._reload_lock:
            change = await self.prepare(new)
            self.commit(new, change)
            return change

    async def prepare(self, new: Config) -> ConfigDiff:
        """The part of a reload that can fail: open the ports ``new`` adds, have its new
        names answered (bounded). Nothing routes by ``new`` until :meth:`commit`;
        :meth:`abort` undoes this. (With workers, the supervisor prepares every worker,
        then commits all or aborts all: one config for all.)"""
        self._check_accepting()
        change = diff(self.config, new)
        if not self._handed:
            self._open_ports(change.added_ports)
        try:  # names new to this config are answered before it takes over (bounded)
            await self.resolve(self.config.names | new.names)
            self._check_accepting()  # stopped meanwhile?
        except BaseException:
            self.abort(change)
            raise
        return change

    def commit(self, new: Config, change: ConfigDiff) -> None:
        """Route by ``new`` from now on (one assignment: no connection sees half a config);
        close the ports it removed."""
        old = self.config
        self.config, self._routes = new, new.routes
        self._lane_alone = lanes_alone(new)
        self.generation += 1
        self.metrics.configured(new)
        self.resolver.track(new.names)
        if not self._handed:
            self._close_ports(change.removed_ports)
        if any(a.drain_timeout_s is not None for a in old.apps + new.apps):
            was = {a.name: a for a in old.apps}
            self._doom(lambda tunnel: self._removed(tunnel, was))

    # -- DrainTimeout: connections left on a removed port or target, or a down target -----

    def _removed(self, tunnel: Tunnel, was: dict) -> float | None:
        """The DrainTimeout for ``tunnel`` if the config in force took away its port or its
        target (None: both are kept, or its app sets no DrainTimeout). An app that is gone
        has the DrainTimeout it had in ``was`` (app name -> App)."""
        app = self._routes.get(tunnel.port)
        if app is not None and app.name == tunnel.app and \
                (tunnel.target is None or tunnel.target in app.targets):
            return None
        now = next((a for a in self.config.apps if a.name == tunnel.app), None) or \
            was.get(tunnel.app)
        return now.drain_timeout_s if now is not None else None

    def _held_down(self, tunnel: Tunnel) -> float | None:
        """The DrainTimeout for ``tunnel`` if the checks hold its target down (or a reload
        took its port or target away)."""
        if tunnel.target is not None and tunnel.target in self.down.get(tunnel.app, ()):
            app = next((a for a in self.config.apps if a.name == tunnel.app), None)
            if app is not None and app.drain_timeout_s is not None:
                return app.drain_timeout_s
        return self._removed(tunnel, {})

    def _doom(self, stale) -> None:
        """Mark the tunnels for which ``stale(tunnel)`` gives a timeout, and close those still
        stale when it has passed (one timer per timeout, not one per connection)."""
        batches: dict[float, list[Tunnel]] = {}
        for tunnel in self.tunnels:
            if tunnel.stale:
                continue  # (already on its way out)
            timeout_s = stale(tunnel)
            if timeout_s is not None:
                tunnel.stale = True
                batches.setdefault(timeout_s, []).append(tunnel)
        for timeout_s, tunnels in batches.items():
            log.info("%s on a removed port or target, or to a target that is down: closed in "
                     "%gs (DrainTimeout) unless it comes back", count(len(tunnels), "connection"),
                     timeout_s)
            self._loop.call_later(timeout_s, self._close_stale, tunnels, stale)

    def _close_stale(self, tunnels: list[Tunnel], stale) -> None:
        for tunnel in tunnels:
            if tunnel.done:
                continue
            tunnel.stale = False
            if stale(tunnel) is None:  # its port or target came back meanwhile
                continue
            log.warning("closing at its DrainTimeout: app=%s port=%s client=%s target=%s in=%d "
                        "out=%d secs=%.0f", tunnel.app, tunnel.port, peer_text(tunnel.client_addr),
                        tunnel.target, tunnel.client.nbytes,
                        tunnel.backend.nbytes if tunnel.backend else 0,
                        time.monotonic() - tunnel.started)
            tunnel.abort("drain-timeout")

    def health_changed(self, changes, reset: bool = False) -> None:
        """The active health checks' news: ``changes`` (app, target, up); with ``reset``,
        they replace all that was held down. Connections to a target that went down are
        closed at their app's DrainTimeout, if it has one."""
        if reset:
            self.down.clear()
        apply_changes(self.down, changes)
        if any(not up for _, _, up in changes) and \
                any(a.drain_timeout_s is not None for a in self.config.apps):
            self._doom(self._held_down)

    def abort(self, change: ConfigDiff) -> None:
        """Undo :meth:`prepare`: close the ports it opened (the names it asked for are
        forgotten at the next reload)."""
        if not self._handed:
            self._close_ports([p for p in change.added_ports if p not in self.config.ports])

    def _check_accepting(self) -> None:
        """A proxy that is stopping (SIGTERM) opens no new port: a reload then fails."""
        if not self.accepting:
            raise listeners.ListenerError("the proxy is stopping: reload refused")

    def stop_accepting(self) -> None:
        self.accepting = False
        self._close_ports(list(self._owned))
        for listener in self._handed:
            listener.close()
        self._handed.clear()

    async def drain(self, grace_s: float | None = None) -> int:
        """Wait up to ``grace_s`` (default: the grace period setting) for open connections
        to finish, then abort the rest.

        Returns how many connections had to be aborted.
        """
        try:
            if self.tunnels:
                self._drained = self._loop.create_future()
                async with asyncio.timeout(self.settings.grace_period_s if grace_s is None
                                           else grace_s):
                    await self._drained
            return 0
        except TimeoutError:
            left = list(self.tunnels)
            for tunnel in left:  # one line each: the operator sees who was cut
                log.warning("closing at the drain deadline: app=%s port=%s client=%s target=%s "
                            "in=%d out=%d secs=%.0f", tunnel.app, tunnel.port,
                            peer_text(tunnel.client_addr), tunnel.target, tunnel.client.nbytes,
                            tunnel.backend.nbytes if tunnel.backend else 0,
                            time.monotonic() - tunnel.started)
                tunnel.abort("shutdown")
            return len(left)
        finally:
            if self._sweeper is not None:
                self._sweeper.cancel()
            if self.resolver is not None:
                self.resolver.close()
