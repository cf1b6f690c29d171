"""``flyproxy serve``: from its arguments to a running service.

Three shapes: a single process (:class:`~appliance.service.server.Server`), a supervisor
with workers (``--workers N`` > 1: :class:`~appliance.service.supervisor.Supervisor`), and
a worker (started by a supervisor: its channel and the config in force arrive as fds).
Errors a user can cause are raised as :class:`LaunchError`, one line each.
"""

from __future__ import annotations

import asyncio
import os
import socket

from .. import config as configmod
from .. import metrics as metricsmod
from ..dataplane import listeners
from ..dataplane.loop import run
from ..settings import Settings, parse_hostport
from . import code, control
from .server import Server
from .supervisor import Supervisor
from .systemd import systemd_fds
from .watch import WatchError


class LaunchError(Exception):
    pass


def sockets_for(listen: str | None, fds: list[int] | None) -> list[socket.socket]:
    """The handed-in sockets: bound for ``--listen``, ``--fd`` N, or systemd's LISTEN_FDS
    ([] in per-port mode, where the proxy binds every port itself)."""
    try:
        if listen:
            host, port = parse_hostport(listen)
            return [listeners.bind(port, host or None)]
        return [listeners.from_fd(fd) for fd in (fds or systemd_fds())]
    except (listeners.ListenerError, ValueError) as e:
        raise LaunchError(str(e)) from None
    except OSError as e:
        raise LaunchError(f"cannot listen on {listen}: {e.strerror}") from None


def serve(config_path: str, config: configmod.Config, settings: Settings,
          sockets: list[socket.socket], *, control_path: str | None, metrics: str | None,
          log_level: str, watch: bool = False) -> int:
    """Run a single process, or a supervisor and its workers; returns the exit status."""
    code.import_all()  # now, not lazily: an upgrade replaces the files under us
    if settings.workers > 1 or settings.supervisor == "yes":
        supervisor = Supervisor(config_path, config, settings, sockets, control_path=control_path,
                                metrics_address=metrics, log_level=log_level, watch=watch)
        try:
            supervisor.serve_metrics()
        except (OSError, ValueError) as e:
            raise LaunchError(f"--metrics {metrics}: {e}") from None
        try:
            supervisor.make_group()
        except OSError as e:
            raise LaunchError(f"cannot make the workers' listening group: {e.strerror}") from None
        try:
            return asyncio.run(supervisor.serve())
        except (OSError, control.ControlError, WatchError) as e:  # control socket, metrics, watch
            raise LaunchError(str(e)) from None
    try:
        collector = metricsmod.create(metrics)
    except (OSError, ValueError) as e:
        raise LaunchError(f"--metrics {metrics}: {e}") from None
    return _run_server(Server(config_path, config, settings, sockets=sockets, metrics=collector,
                              control_path=control_path, watch=watch), settings)


def resume(state_fd: int, settings: Settings, *, control_path: str | None, log_level: str,
           watch: bool, metrics: str | None) -> int:
    """A supervisor re-executed by an upgrade (reexec.py): the state its previous image
    handed over, the same sockets, the workers adopted; then on as ``serve``."""
    from . import reexec

    code.import_all()
    state = reexec.load(state_fd)
    try:
        config = configmod.loads(state["config"].encode(), state["config_path"])
    except configmod.ConfigError as e:  # (it was in force a moment ago)
        raise LaunchError(str(e)) from None
    sockets = [listeners.from_fd(fd) for fd in state["sockets"]]
    supervisor = Supervisor(state["config_path"], config, settings, sockets,
                            control_path=control_path, metrics_address=metrics,
                            log_level=log_level, watch=watch)
    supervisor.resume(state)
    try:
        return asyncio.run(supervisor.serve())
    except (OSError, control.ControlError, WatchError) as e:
        raise LaunchError(str(e)) from None


def serve_worker(config_path: str, config_fd: int, channel_fd: int, settings: Settings,
                 sockets: list[socket.socket], *, generation: int, collect_metrics: bool,
                 limits: str | None = None) -> int:
    """A worker: the config in force comes from its supervisor (an anonymous file), its
    counts go to the supervisor over its channel, which serves them."""
    code.import_all()
    with os.fdopen(config_fd, "rb") as f:
        try:
            config = configmod.loads(f.read(), config_path)
        except configmod.ConfigError as e:
            raise LaunchError(str(e)) from None
    channel = listeners.channel_from_fd(channel_fd)
    collector = metricsmod.Metrics() if collect_metrics else metricsmod.NullMetrics()
    server = Server(config_path, config, settings, sockets=sockets, metrics=collector,
                    channel=channel)
    server.proxy.generation = generation
    if limits:  # the host's connection limits' table, and our column in it
        from ..dataplane.limits import LimitsError, Table

        fd, column = limits.split(":")
        try:
            server.proxy.share_limits(Table(int(fd), int(column)))
        except (LimitsError, OSError, ValueError) as e:
            raise LaunchError(f"--limits {limits}: {e}") from None
    return _run_server(server, settings)


def _run_server(server: Server, settings: Settings) -> int:
    try:
        return run(server.serve(), settings.loop)
    except (listeners.ListenerError, control.ControlError, WatchError) as e:
        raise LaunchError(str(e)) from None
