"""``flyproxy serve``: from its options (``settings.ServeConfig``) to a running service.

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
from ..settings import ServeConfig, parse_hostport
from . import code, control
from .server import Server
from .supervisor import Supervisor
from .systemd import systemd_fds
from .watch import WatchError


class LaunchError(Exception):
    pass


def sockets_for(settings: ServeConfig) -> list[socket.socket]:
    """The handed-in sockets: bound for ``--listen``, ``--fd`` N, or systemd's LISTEN_FDS
    ([] in per-port mode, where the proxy binds every port itself)."""
    listen = settings.listen
    try:
        if listen:
            host, port = parse_hostport(listen)
            return [listeners.bind(port, host or None)]
        return [listeners.from_fd(fd) for fd in (settings.fd or systemd_fds())]
    except (listeners.ListenerError, ValueError) as e:
        raise LaunchError(str(e)) from None
    except OSError as e:
        raise LaunchError(f"cannot listen on {listen}: {e.strerror}") from None


def serve(config: configmod.Config, settings: ServeConfig) -> int:
    """Run a single process, or a supervisor and its workers; returns the exit status."""
    code.import_all()  # now, not lazily: an upgrade replaces the files under us
    sockets = sockets_for(settings)
    if settings.workers > 1 or settings.supervisor == "yes":
        supervisor = Supervisor(config, settings, sockets)
        try:
            supervisor.serve_metrics()
        except (OSError, ValueError) as e:
            raise LaunchError(f"--metrics {settings.metrics}: {e}") from None
        try:
            supervisor.make_group()
        except OSError as e:
            raise LaunchError(f"cannot make the workers' listening group: {e.strerror}") from None
        try:
            return asyncio.run(supervisor.serve())
        except (OSError, control.ControlError, WatchError) as e:  # control socket, metrics, watch
            raise LaunchError(str(e)) from None
    try:
        collector = metricsmod.create(settings.metrics)
    except (OSError, ValueError) as e:
        raise LaunchError(f"--metrics {settings.metrics}: {e}") from None
    return _run_server(Server(config, settings, sockets=sockets, metrics=collector), settings)


def resume(settings: ServeConfig) -> int:
    """A supervisor re-executed by an upgrade (reexec.py): the state its previous image
    handed over (``--resume-fd``), the same sockets, the workers adopted; then on as
    ``serve``."""
    from . import reexec

    code.import_all()
    state = reexec.load(settings.resume_fd)
    try:
        config = configmod.loads(state["config"].encode(), state["config_path"])
    except configmod.ConfigError as e:  # (it was in force a moment ago)
        raise LaunchError(str(e)) from None
    sockets = [listeners.from_fd(fd) for fd in state["sockets"]]
    supervisor = Supervisor(config, settings, sockets)
    supervisor.resume(state)
    try:
        return asyncio.run(supervisor.serve())
    except (OSError, control.ControlError, WatchError) as e:
        raise LaunchError(str(e)) from None


def serve_worker(settings: ServeConfig) -> int:
    """A worker: the config in force comes from its supervisor (an anonymous file,
    ``--config-fd``), its counts go to the supervisor over its channel
    (``--worker-channel``), which serves them."""
    code.import_all()
    sockets = sockets_for(settings)
    with os.fdopen(settings.config_fd, "rb") as f:
        try:
            config = configmod.loads(f.read(), settings.config)
        except configmod.ConfigError as e:
            raise LaunchError(str(e)) from None
    channel = control.channel_from_fd(settings.worker_channel)
    collector = metricsmod.Metrics() if settings.collect_metrics else metricsmod.NullMetrics()
    server = Server(config, settings, sockets=sockets, metrics=collector, channel=channel)
    server.proxy.generation = settings.generation
    if settings.limits:  # the host's connection limits' table, and our column in it
        from ..dataplane.limits import LimitsError, Table

        try:
            fd, column = settings.limits.split(":")
            server.proxy.share_limits(Table(int(fd), int(column)))
        except (LimitsError, OSError, ValueError) as e:
            raise LaunchError(f"--limits {settings.limits}: {e}") from None
    return _run_server(server, settings)


def _run_server(server: Server, settings: ServeConfig) -> int:
    try:
        return run(server.serve(), settings.loop)
    except (listeners.ListenerError, control.ControlError, WatchError) as e:
        raise LaunchError(str(e)) from None
