"""The data plane: accept, route by the port the client dialled, connect, relay.

A :class:`Proxy` holds the current :class:`~appliance.config.Config` and its
listeners. Listeners come in two kinds:

- *owned*: in per-port mode the proxy binds every configured port and opens or
  closes listeners as reloads add or remove ports;
- *handed in*: sockets from systemd or a caller (single-listener BPF mode); they
  are never closed by a reload, and a connection whose local port is not in the
  config is closed at once.

Either way a connection is routed by its local port, looked up in the config at
accept time, so a reload changes where *new* connections go and never touches the
connections already relayed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

from . import balancer, listeners
from .config import Config, ConfigDiff, diff
from .relay import Side, Tunnel

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
GRACE_PERIOD_S = 30.0


class ClientSide(Side):
    """The accepted side; on connection_made it routes and starts the backend connect."""

    __slots__ = ("proxy", "listen_port")

    def __init__(self, proxy: Proxy, listen_port: int | None) -> None:
        super().__init__(None)
        self.proxy = proxy
        self.listen_port = listen_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy._accepted(self)


class Proxy:
    def __init__(self, config: Config, *, host: str | None = None,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        self.config = config
        self.generation = 1
        self.host = host
        self.connect_timeout_s = connect_timeout_s
        self.tunnels: set[Tunnel] = set()
        self._routes = config.routes
        self._owned: dict[int, asyncio.Server] = {}  # port -> server, per-port mode
        self._handed: list[asyncio.Server] = []
        self._reload_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self.accepting = False

    def __repr__(self) -> str:
        mode = "handed-in" if self._handed else "per-port"
        return (f"<Proxy {mode} generation={self.generation} {self.config.summary()} "
                f"active={len(self.tunnels)}>")

    # -- listeners ---------------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Start accepting: on the given sockets, or on every configured port."""
        if sockets:
            for sock in sockets:
                self._handed.append(await self._serve(sock, None))
        else:
            await self._open_ports(self.config.ports)
        self.accepting = True

    async def _serve(self, sock: socket.socket, port: int | None) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: ClientSide(self, port), sock=sock,
                                        backlog=listeners.BACKLOG)

    async def _open_ports(self, ports) -> None:
        """Bind all ``ports`` or none: on failure close what this call opened and raise."""
        opened: dict[int, asyncio.Server] = {}
        try:
            for port in sorted(ports):
                try:
                    sock = listeners.bind(port, self.host)
                except OSError as e:
                    raise listeners.ListenerError(
                        f"cannot listen on {self.host or '*'}:{port}: {e.strerror}") from None
                opened[port] = await self._serve(sock, port)
        except BaseException:
            for server in opened.values():
                server.close()
            raise
        self._owned.update(opened)

    def _close_ports(self, ports) -> None:
        for port in ports:
            server = self._owned.pop(port, None)
            if server is not None:
                server.close()  # stops accepting; established connections are untouched

    @property
    def listening_ports(self) -> list[int]:
        return sorted(self._owned)

    # -- connections ---------------------------------------------------------------

    def _accepted(self, client: ClientSide) -> None:
        transport = client.transport
        port = client.listen_port
        if port is None:
            port = transport.get_extra_info("sockname")[1]
        app = self._routes.get(port)
        if app is None:
            log.warning("connection from %s to port %s: no app has this port; closed",
                        transport.get_extra_info("peername"), port)
            transport.abort()
            return
        tunnel = Tunnel(client, app.name, port, self._closed)
        self.tunnels.add(tunnel)
        self._idle.clear()
        tunnel.connecting = asyncio.ensure_future(self._connect(tunnel, app.targets))

    async def _connect(self, tunnel: Tunnel, targets) -> None:
        try:
            transport, backend, target, failures = await balancer.connect(
                targets, lambda: Side(tunnel), self.connect_timeout_s)
        except balancer.AllTargetsFailed as e:
            log.warning("app %s port %s: all %d targets failed (%s); closing client",
                        tunnel.app, tunnel.port, len(targets), e)
            tunnel.client.transport.close()
            return
        finally:
            tunnel.connecting = None
        tunnel.target, tunnel.attempts = target, len(failures) + 1
        if failures:
            log.info("app %s port %s: connected to %s after %d attempts (%s)", tunnel.app,
                     tunnel.port, target, tunnel.attempts, balancer.describe(failures))
        tunnel.link(backend)

    def _closed(self, tunnel: Tunnel, exc: Exception | None) -> None:
        self.tunnels.discard(tunnel)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("closed app=%s port=%s target=%s attempts=%d in=%d out=%d secs=%.3f end=%s",
                      tunnel.app, tunnel.port, tunnel.target, tunnel.attempts,
                      tunnel.client.nbytes, tunnel.backend.nbytes if tunnel.backend else 0,
                      time.monotonic() - tunnel.started, exc or "closed")
        if not self.tunnels:
            self._idle.set()

    # -- reload and shutdown -----------------------------------------------------------

    async def reload(self, new: Config) -> ConfigDiff:
        """Apply ``new``: open added ports, switch routes, close removed ports.

        All or nothing: if an added port cannot be bound, nothing changes and the
        error is raised. Existing connections are never touched.
        """
        async with self._reload_lock:
            change = diff(self.config, new)
            if not self._handed:
                await self._open_ports(change.added_ports)
            self.config, self._routes = new, new.routes
            self.generation += 1
            if not self._handed:
                self._close_ports(change.removed_ports)
            return change

    def stop_accepting(self) -> None:
        self.accepting = False
        self._close_ports(list(self._owned))
        for server in self._handed:
            server.close()
        self._handed.clear()

    async def drain(self, grace_s: float = GRACE_PERIOD_S) -> int:
        """Wait up to ``grace_s`` for open connections to finish, then abort the rest.

        Returns how many connections had to be aborted.
        """
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
            return 0
        except TimeoutError:
            left = list(self.tunnels)
            for tunnel in left:
                tunnel.close(abort=True)
            return len(left)
