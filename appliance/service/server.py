"""The long-running proxy process: a single process, or one worker of a supervisor.

Its lifecycle is ``lifecycle.Service``'s; here is what it does at each step.

Startup: take handed-in sockets (systemd's LISTEN_FDS, or ``--fd``) or bind every
configured port, then report READY to systemd.

Main loop: SIGHUP re-reads the config file, validates it, and applies it; an invalid
config is logged with every error and the old one keeps serving.

Shutdown: SIGTERM/SIGINT stops accepting and lets open connections finish for a
bounded grace period, then aborts what is left. A second signal aborts at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from .. import config as configmod
from ..dataplane import listeners
from ..dataplane.checks import decode_changes
from ..dataplane.proxy import Proxy
from ..logs import RateLimited, count
from .. import metrics_http
from ..metrics import NullMetrics
from ..settings import ServeConfig
from ..statuspage import StatusPage
from . import control, target_state
from .health import HostChecks
from .lifecycle import Service
from .systemd import notify

log = logging.getLogger(__name__)


class Server(Service):
    def __init__(self, config: configmod.Config, settings: ServeConfig, *,
                 sockets: list[socket.socket] | None = None, metrics: NullMetrics | None = None,
                 channel: socket.socket | None = None) -> None:
        super().__init__(settings)
        self.checks: HostChecks | None = None  # active health checks (a single process's own)
        self.channel = channel  # set in a worker: its supervisor's requests come here
        self._control = None
        self.metrics = metrics or NullMetrics()
        self.proxy = Proxy(config, self.settings, metrics=self.metrics)
        self.sockets = sockets or []
        self._loop_errors = RateLimited(log)
        self._drain: asyncio.Task | None = None
        self._drained: asyncio.Event | None = None  # set once drained (made on the loop)
        self._prepared: tuple | None = None  # a supervisor's reload: (config, diff) to commit
        self._channel_tasks: set[asyncio.Task] = set()  # answers under way to a supervisor

    def __repr__(self) -> str:
        return f"<Server {self.config_path} {self.proxy!r}>"

    @property
    def is_worker(self) -> bool:
        """One of a supervisor's workers (started with a channel to it), not a single
        process: the supervisor runs the health checks and tells us their changes, takes
        Ctrl-C, and sends the commands only a supervisor may (prepare, commit, drain...)."""
        return self.channel is not None

    def status_line(self) -> str:
        p = self.proxy
        return (f"generation {p.generation}: {p.config.summary()}, "
                f"{count(len(p.tunnels), 'active connection')}")

    def status(self) -> dict:
        p = self.proxy
        checks = {(r["app"], r["target"]): r for r in self.checks.state()} if self.checks else {}
        names = {row["name"]: row for row in p.resolver.status()} if p.resolver else {}

        def target(app: str, t) -> dict:
            check = checks.get((app, str(t)))
            return {"target": str(t), "health": p.health.describe(t),
                    **target_state.state(check=check, held_down=t in p.down.get(app, ()),
                                         name=names.get(t.host) if t.addrs is None else None,
                                         failure=p.health.failed.get(t),
                                         eject_s=p.health.eject_s, seen=t in p.health.seen),
                    **({"check": check} if check else {})}

        return {
            "config": self.config_path, "digest": p.config.digest, "generation": p.generation,
            "mode": "handed-in" if self.sockets else "per-port", "pid": os.getpid(),
            "listeners": listeners.described(self.sockets),  # (what bpf register may take)
            "active": len(p.tunnels), "accepting": p.accepting,
            "apps": [{"name": a.name, "ports": list(a.ports), "active": p.active.get(a.name, 0),
                      "held_down": len(p.down.get(a.name, ())),  # by the checks, as told
                      "max_connections": a.max_connections, "balance": a.balance,
                      "proxy_protocol": a.proxy_protocol,
                      "targets": [target(a.name, t) for t in a.targets]} for a in p.config.apps],
            "names": p.resolver.status() if p.resolver is not None else [],
            "fds": dict(zip(("open", "limit"), metrics_http.fds())),
            "last_reload": self.last_reload,
        }

    async def startup(self) -> bool:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._drained = asyncio.Event()
        await self.proxy.start(self.sockets)
        if not self.is_worker:  # a worker is told its supervisor's checks instead
            self.checks = HostChecks(self.settings, self._checks_changed, self.proxy.resolver)
            self.checks.apply(self.proxy.config)
            self.metrics.checks = self.checks.state
        if self.settings.control:
            self._control = await control.start(self, self.settings.control)
        if self.metrics.http is not None:
            self.metrics.http.page = StatusPage(self.status, lambda: self.metrics)  # GET /
            await self.metrics.http.start()
        self.start_watcher(lambda: self.proxy.config.digest)
        self.install_signals(interrupt=not self.is_worker)  # (a worker's Ctrl-C: see below)
        if self.is_worker:  # Ctrl-C reaches the supervisor, which sends SIGTERM
            self.spawn(self._serve_channel())
        where = (count(len(self.sockets), "handed-in socket") if self.sockets
                 else count(len(self.proxy.listening_ports), "port"))
        log.info("serving %s on %s", self.proxy.config.summary(), where)
        return True

    def stop_accepting(self) -> None:
        if self.checks is not None:
            self.checks.close()
        self.proxy.stop_accepting()
        if self._control is not None:
            self._control.close()
            control.remove(self.settings.control)
        if self.metrics.http is not None:
            self.metrics.http.close()

    async def shutdown(self) -> None:
        n = len(self.proxy.tunnels)
        if n:
            log.info("stopped accepting; waiting up to %gs for %s", self.grace_s,
                     count(n, "connection"))
        self._drain = asyncio.ensure_future(self.proxy.drain(self.grace_s))
        try:
            aborted = await self._drain
        except asyncio.CancelledError:  # second signal
            aborted = len(self.proxy.tunnels)
            for tunnel in list(self.proxy.tunnels):
                tunnel.abort("shutdown")
        if aborted:
            log.warning("aborted %s still open at shutdown", count(aborted, "connection"))
        self._drained.set()
        if self._channel_tasks:  # the answer to a supervisor's drain goes out before we exit
            await asyncio.wait(list(self._channel_tasks), timeout=5)

    def stop_now(self) -> None:
        if self._drain is not None:
            self._drain.cancel()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The event loop's own errors (e.g. accept() failing with EMFILE: asyncio then
        pauses accepting for a second by itself): logged at most once per 10 s each."""
        exc = context.get("exception")
        key = f"{type(exc).__name__}:{getattr(exc, 'errno', '')}:{context.get('message')}"
        self._loop_errors.error(key, "%s%s", context.get("message", "event loop error"),
                                f": {exc!r}" if exc else "")

    def _checks_changed(self, changes) -> None:
        self.proxy.health_changed(changes)

    async def _serve_channel(self) -> None:
        await control.serve_channel(self, self.channel, self._channel_tasks)
        if not self._stop.is_set():
            log.warning("the supervisor went away: shutting down gracefully")
            self._stop.set()

    async def handle_command(self, command: str) -> dict:
        """One control request (from the control socket or a supervisor's channel)."""
        if command == "reload":
            ok, message = await self.reload()
            return control.reload_reply(ok, message, self.proxy.generation,
                                        self.proxy.config.digest)
        if command == "ping":  # a supervisor's heartbeat: the loop is alive
            return {"ok": True}
        if command == "status":
            return {"ok": True, **self.status()}
        if command.startswith("health "):  # the supervisor's checks: what changed
            if not self.is_worker:  # not for the control socket: only a supervisor knows
                return {"ok": False, "error": "'health' is a supervisor's command to its "
                                              "workers, not a control command"}
            reset, changes = decode_changes(command)
            self.proxy.health_changed(changes, reset)
            return {"ok": True}
        if command.startswith(("prepare ", "commit", "abort")):  # a supervisor's reload
            if not self.is_worker:
                return {"ok": False, "error": f"{command.split()[0]!r} is a supervisor's "
                                              "command to its workers, not a control command"}
            return await self._two_phase(command)
        if command.startswith("drain "):  # a supervisor's: a newer generation serves now
            if not self.is_worker:
                return {"ok": False, "error": "'drain' is a supervisor's command to its "
                                              "workers, not a control command"}
            return await self._drain_for_supervisor(float(command.split()[1]))
        if command == "reload new-workers":
            return {"ok": False, "error": "--new-workers needs a supervisor (serve "
                                          "--supervisor yes, or more than one worker)"}
        if command == "metrics" and (snapshot := self.metrics.snapshot()) is not None:
            return {"ok": True, "metrics": snapshot}
        return {"ok": False, "error": f"unknown command {command[:60]!r}"}

    async def _two_phase(self, command: str) -> dict:
        """A supervisor's reload, all or nothing over its workers: ``prepare <config>``
        (the bytes it validated once: never the file, which may have changed since) opens
        added ports and resolves new names; ``commit`` then switches, ``abort`` undoes."""
        p = self.proxy
        if command.startswith("prepare "):
            if self._prepared is not None:  # (a supervisor reloads one at a time)
                p.abort(self._prepared[1])
                self._prepared = None
            try:
                new = configmod.loads(command[len("prepare "):].encode(), self.config_path)
                self._prepared = (new, await p.prepare(new))
            except (configmod.ConfigError, listeners.ListenerError) as e:
                return {"ok": False, "error": str(e)}
            return {"ok": True, "digest": new.digest}
        if self._prepared is None:
            return {"ok": False, "error": f"{command!r} without a prepared config"}
        new, change = self._prepared
        self._prepared = None
        if command == "abort":
            p.abort(change)
            return {"ok": True}
        p.commit(new, change)
        self.metrics.reloaded(True, p.generation)
        log.info("reloaded to generation %d (%s): %s", p.generation, new.summary(), change)
        return {"ok": True, "digest": new.digest, "generation": p.generation}

    async def _drain_for_supervisor(self, drain_s: float) -> dict:
        """Stop accepting and let open connections finish for up to ``drain_s`` (a newer
        generation of workers serves); answered once drained, with the last counts."""
        if not self._stop.is_set():
            log.info("a newer generation serves: draining %d connections for up to %gs",
                     len(self.proxy.tunnels), drain_s)
            self.grace_s = drain_s
            self._stop.set()
        elif drain_s == 0 and self._drain is not None:  # too many generations: now
            self._drain.cancel()
        await self._drained.wait()
        snapshot = self.metrics.snapshot()
        return {"ok": True, "metrics": snapshot}

    async def reload(self) -> tuple[bool, str]:
        """Re-read the config file and apply it; returns (ok, message). Never raises for bad input."""
        if self._stop.is_set():  # draining: no new ports, and the reply says so
            return False, "stopping: reload refused"
        notify("RELOADING=1", "STATUS=reloading")
        try:
            # read and validated off the loop (bounded: config.MAX_BYTES), applied on it
            new = await asyncio.to_thread(configmod.load, self.config_path)
            change = await self.proxy.reload(new)
        except (configmod.ConfigError, listeners.ListenerError) as e:
            return self.reload_failed(f"reload of {self.config_path} failed, "
                                      f"still serving generation {self.proxy.generation}:\n{e}")
        except Exception as e:  # a bug: still answer, and still tell systemd we are ready
            log.exception("reload of %s failed", self.config_path)
            return self.reload_failed(f"reload of {self.config_path} failed (internal error: "
                                      f"{e!r}), still serving generation "
                                      f"{self.proxy.generation}")
        if self.checks is not None:
            self.checks.apply(new)
        return self.reloaded(f"reloaded to generation {self.proxy.generation} "
                             f"({new.summary()}): {change}")

    def count_reload(self, ok: bool) -> None:
        self.metrics.reloaded(ok, self.proxy.generation)
