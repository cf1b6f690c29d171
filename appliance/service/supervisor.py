"""More than one worker process: the supervisor, and N workers sharing the listeners.

One event loop uses one core, and a new connection costs a Python proxy more CPU than it
costs HAProxy; ``flyproxy serve --workers N`` spreads connections over N processes.

The supervisor is the service's main process. It validates the config, holds the
listening sockets (handed in by systemd, or bound for ``--listen``), and starts each
worker (``workers.py``) with those sockets:

- per-port mode: every worker binds every port with SO_REUSEPORT and the kernel spreads
  new connections over them by hash;
- handed-in sockets are shared: every worker accepts on them. They alone would balance
  badly (whichever worker wakes first takes a whole burst), so the supervisor also makes
  a *group*: one listening socket per worker, bound together with SO_REUSEPORT on an
  ephemeral port. ``flyproxy bpf register --spread`` puts a member in the BPF program's
  group map; the kernel then picks the member (the worker) by a hash of each connection.
  The supervisor keeps every member open, so a restarted worker gets its member back and
  connections hashed to it wait in its queue meanwhile;
- the control socket, SIGHUP and the metrics endpoint fan out over the workers' channels:
  a reload is validated once, then applied by every worker; status and metrics are
  gathered and summed;
- READY=1 goes to systemd once the workers have answered; a worker that dies is logged
  and started again on the config in force, after a pause that doubles from 0.1 s; one
  that dies more than ``RESTARTS`` times in ``RESTART_WINDOW_S`` is *failing* (status,
  metrics, log) and tried again every ``MAX_BACKOFF_S`` while the others serve; only when
  no worker can run does the supervisor exit 1, for systemd to restart it;
- SIGTERM/SIGINT are passed on to the workers (once per signal received: the second
  aborts what is left), and the supervisor exits when they have.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import socket
import sys
import time

from .. import config as configmod
from ..settings import Settings
from . import code, control, reexec
from .systemd import notify
from .workers import (CHANNEL_LIMIT, METRICS_TIMEOUT_S, PING_TIMEOUT_S, RELOAD_TIMEOUT_S,
                      REQUEST_TIMEOUT_S, Worker, WorkerGone)

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0  # a worker binds every port (thousands, per-port mode) and imports
HEARTBEAT_S = 1.0  # each worker is pinged this often; one that misses PING_TIMEOUT_S is replaced
MAX_GENERATIONS = 4  # worker generations at once (serving + draining); the oldest is closed
RESTARTS, RESTART_WINDOW_S = 5, 60.0  # more exits than this in the window: failing
MAX_BACKOFF_S = 10.0  # the longest pause before a worker is started again
_BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
         "from appliance.cli import main; sys.exit(main())")


class Supervisor:
    def __init__(self, config_path: str, config: configmod.Config, settings: Settings,
                 sockets: list[socket.socket], *, control_path: str | None = None,
                 metrics_address: str | None = None, log_level: str = "info",
                 watch: bool = False) -> None:
        self.config_path = config_path
        self.watch = watch  # serve --watch (watch.py): the supervisor watches, for all
        self.watcher = None
        self.checker = None  # active health checks: one set for the host, told to every worker
        self.resolver = None  # ... with the addresses of host-name targets
        self.config = config
        self.generation = 1
        self.settings = settings
        self.workers = [Worker(i) for i in range(settings.workers)]  # the serving generation
        self.worker_generation = 1
        self.code = code.identify()  # what this process and its workers loaded
        self.started = time.time()
        self.old: list[Generation] = []  # older generations, draining
        self.retired = None  # the counts of workers that finished draining (Metrics)
        # a worker is `flyproxy serve` with exactly our settings (settings.py)
        self.worker_argv = ["--log-level", log_level, "serve", "-c", config_path,
                            *settings.to_argv(), *(["--collect-metrics"] if metrics_address
                                                   else [])]
        self.sockets = sockets
        self.group: list[socket.socket] = []  # one per worker, with handed-in sockets
        self.control_path = control_path
        self.metrics_address = metrics_address
        self.grace_s = settings.grace_period_s
        self.reloads = {"ok": 0, "failed": 0}
        self.restarts = 0
        self._restart_times: collections.deque[float] = collections.deque()
        self._stop = asyncio.Event()
        self._signals = 0
        self._exit = 0
        self._tasks: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()
        self.metrics_http = None  # the /metrics endpoint, bound by serve_metrics()
        self.control_server: asyncio.AbstractServer | None = None
        self.image = code.identify()  # the code this process imported (re-exec when stale)
        self.resumed: dict | None = None  # the state a previous image handed over
        self._quiet = False  # about to re-exec: no new request to a worker

    def __repr__(self) -> str:
        return f"<Supervisor {self.config_path} workers={len(self.workers)}>"

    # -- lifecycle ---------------------------------------------------------------------

    def make_group(self) -> None:
        """With handed-in sockets: one SO_REUSEPORT listener per worker on an ephemeral port
        (dual-stack on every address, as the BPF program assigns both families to it;
        connections that reach it directly find no app for its port and are closed)."""
        from ..dataplane import listeners

        if not self.sockets or len(self.workers) < 2:
            return
        first = listeners.bind(0, None, reuse_port=True)
        host, port = first.getsockname()[:2]
        self.group = [first] + [listeners.bind(port, host, reuse_port=True)
                                for _ in self.workers[1:]]
        log.info("worker group on [%s]:%d (spread by flyproxy bpf register --spread)", host, port)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        if self.resumed is not None:  # an upgrade re-executed us: the workers run already
            await self._adopt(self.resumed)
        else:
            started = await asyncio.gather(*(self._start(w) for w in self.workers),
                                           return_exceptions=True)
            for error in started:
                if isinstance(error, BaseException):
                    if not isinstance(error, WorkerGone):
                        raise error
                    log.error("%s", error)
        reexec.unblock_signals()  # (blocked across the exec that made this image, if one did)
        if not any(w.ready for w in self.workers):
            log.error("no worker started; giving up")
            await self._shutdown()
            return 1
        self.start_checks()
        for w in self.workers:
            self._spawn(self._keep(w))
            self._spawn(self._heartbeat(w))
        if self.control_path:
            self.control_server = await control.start(self, self.control_path,
                                                      sock=self._handed("control"))
        if self.metrics_http is not None:
            await self.metrics_http.start()
        if self.resumed is not None and self.resumed.get("upgrade"):
            self._spawn(self._finish_upgrade(self.resumed["upgrade"]))
        if self.watch:
            from .watch import ConfigWatcher
            self.watcher = ConfigWatcher(self.config_path, self.reload, lambda: self.config.digest)
            self.watcher.start()
        pids = ", ".join(str(w.proc.pid) for w in self.workers)
        log.info("serving %s with %d workers (pids %s)", self.config.summary(),
                 len(self.workers), pids)
        notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        await self._stop.wait()
        notify("STOPPING=1", "STATUS=draining connections")
        if self.watcher is not None:
            self.watcher.close()
        self.checker.close()
        self.resolver.close()
        for member in self.group:  # once the workers close theirs, the group is gone and
            member.close()  # the BPF program sends new connections to the listener
        if self.control_server is not None:
            self.control_server.close()
        if self.metrics_http is not None:
            self.metrics_http.close()
        await self._shutdown()
        log.info("stopped")
        return self._exit

    # -- active health checks ------------------------------------------------------------

    def start_checks(self) -> None:
        from ..dataplane.checks import Checker
        from ..dataplane.resolver import Resolver

        self.resolver = Resolver(asyncio.get_running_loop(), self.settings)
        self.checker = Checker(self._check_addresses, self._checks_changed)
        self.apply_checks(self.config)

    def apply_checks(self, config: configmod.Config) -> None:
        self.resolver.track(t.host for a in config.apps if a.health_check for t in a.targets
                            if t.addrs is None)
        self.checker.apply(config)

    def _check_addresses(self, target) -> list:
        name = self.resolver.names.get(target.host)
        return name.sockaddrs(target.port) if name is not None and name.addrs else []

    def _checks_changed(self, changes) -> None:
        """Targets changed state: every worker is told, each in one message at a time, the
        changes since its last (coalesced: a target that flapped is sent once, as it is)."""
        for w in self.workers:
            w.health_pending.update(((app, target), up) for app, target, up in changes)
            if w.ready and not w.health_sending:
                self._spawn(self._send_health(w))

    async def _send_health(self, w: Worker) -> None:
        from ..dataplane.checks import encode_changes

        w.health_sending = True
        try:
            while w.health_pending and w.ready and not self._quiet:
                batch, w.health_pending = w.health_pending, {}
                command = encode_changes((app, t, up) for (app, t), up in batch.items())
                await w.request(command)
        except WorkerGone as e:  # replaced: a new worker is told the whole set at its start
            log.error("%s", e)
        finally:
            w.health_sending = False

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fds(self, w: Worker) -> list[int]:
        """The sockets worker ``w`` serves: every handed-in one, and its group member."""
        own = [self.group[w.index].fileno()] if self.group else []
        return [s.fileno() for s in self.sockets] + own

    def _worker_args(self, w: Worker) -> list[str]:
        flags = ["-I"] if sys.flags.isolated else []
        fds = [str(fd) for fd in self._fds(w)]
        return [sys.executable, *flags, "-c", _BOOT, _package_parent(), *self.worker_argv,
                "--generation", str(self.generation), *(a for fd in fds for a in ("--fd", fd))]

    async def _start(self, w: Worker) -> None:
        await w.start(self._worker_args(w), self._fds(w), self.config.raw)
        try:
            await w.request("status", STARTUP_TIMEOUT_S)
            if self.checker is not None:  # a replacement: what is down now, all of it
                from ..dataplane.checks import encode_changes
                w.health_pending = {}  # (changes from here on are sent once it is ready)
                await w.request(encode_changes(self.checker.down_changes(), reset=True),
                                STARTUP_TIMEOUT_S)
        except WorkerGone:
            code = await w.proc.wait()
            w.close_channel()
            raise WorkerGone(f"{w} exited with status {code} before it was ready "
                             "(its error is logged above)") from None
        w.ready = True
        if w.health_pending:
            self._spawn(self._send_health(w))

    async def _keep(self, w: Worker) -> None:
        """Keep worker ``w`` running: when it exits (or could not start), start another
        after a pause that doubles from 0.1 s up to MAX_BACKOFF_S. A worker that exits more
        than RESTARTS times in RESTART_WINDOW_S is *failing*: logged, shown in status and
        metrics, and still tried every MAX_BACKOFF_S while the others serve. The supervisor
        gives up (exit 1, for systemd to restart it) only when every worker is failing and
        none serves."""
        while not self._stop.is_set():
            if w.proc is not None and w.proc.returncode is None:
                status = await w.proc.wait()
                if self._stop.is_set() or w.draining:
                    return  # (a draining worker's end is _drain's)
                w.close_channel()
                log.error("%s exited with status %s", w, status)
            now = time.monotonic()
            w.exits.append(now)
            while w.exits and now - w.exits[0] > RESTART_WINDOW_S:
                w.exits.popleft()
            if len(w.exits) > RESTARTS:
                if w.failing is None:
                    log.error("worker %d failed %d times in %gs; still trying every %gs, "
                              "while %d of %d workers serve", w.index, len(w.exits),
                              RESTART_WINDOW_S, MAX_BACKOFF_S,
                              sum(x.ready for x in self.workers), len(self.workers))
                w.failing = f"exited {len(w.exits)} times in {RESTART_WINDOW_S:g}s"
                if not any(x.ready for x in self.workers) and all(x.failing for x in self.workers):
                    log.error("no worker can run; giving up")
                    self._exit = 1
                    self._stop.set()
                    return
            backoff_s = min(MAX_BACKOFF_S, 0.1 * 2 ** (len(w.exits) - 1))
            w.retry_at = now + backoff_s
            try:  # a short pause, longer each time, so a crash loop is not a busy loop
                async with asyncio.timeout(backoff_s):
                    await self._stop.wait()
                return  # stopping meanwhile
            except TimeoutError:
                pass
            w.retry_at = None
            self.restarts += 1
            try:
                async with self._reload_lock:  # on the config in force, not one half-applied
                    await self._start(w)
            except WorkerGone as e:
                log.error("%s", e)
                continue  # counted as an exit on the next pass
            if w.failing is not None:
                log.info("%s started again after failing (%s)", w, w.failing)
            else:
                log.info("%s started", w)
            w.failing = None

    async def _heartbeat(self, w: Worker) -> None:
        """Ping ``w`` every HEARTBEAT_S: a worker that is hung (stopped, stuck in a loop)
        misses the deadline and is killed; _keep starts another. So a hung worker is
        found in seconds, not at the next status or reload, and its listeners' share of
        new connections goes to a live worker (per-port mode: its SO_REUSEPORT sockets
        close with it; BPF mode: its group member waits in the supervisor's hands for the
        replacement, the connections queued there are not lost)."""
        while not self._stop.is_set():
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            if w.draining and w.proc.returncode is not None:
                return
            if not w.ready or self._quiet:
                continue  # starting, or being replaced; or about to re-exec
            try:
                await w.request("ping", PING_TIMEOUT_S)
            except WorkerGone as e:
                if not self._stop.is_set():
                    log.error("%s", e)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: shutting down gracefully (send again to stop at once)", sig.name)
            self._stop.set()
        else:
            log.info("%s again: workers close all connections now", sig.name)
            for w in self.workers:
                w.signal(signal.SIGTERM)

    def all_workers(self) -> list[Worker]:
        """The serving generation's workers and every draining one's."""
        return [w for g in self.old for w in g.workers] + self.workers

    async def _shutdown(self) -> None:
        """SIGTERM every worker of every generation and wait for them (bounded: then they
        are killed): the supervisor never exits while a worker holds connections."""
        workers = self.all_workers()
        for w in workers:
            w.signal(signal.SIGTERM)
        running = [w.proc.wait() for w in workers
                   if w.proc is not None and w.proc.returncode is None]
        try:
            async with asyncio.timeout(self.grace_s + 15):
                await asyncio.gather(*running)
        except TimeoutError:
            log.error("workers still running %gs after SIGTERM; killing them", self.grace_s + 15)
            for w in workers:
                w.kill()
            await asyncio.gather(*(w.proc.wait() for w in workers if w.proc is not None))
        for w in workers:
            w.close_channel()

    # -- the control surface (same commands as a single process's) ----------------------

    async def _gather(self, command: str, timeout_s: float = REQUEST_TIMEOUT_S,
                      workers: list[Worker] | None = None
                      ) -> list[tuple[Worker, dict | WorkerGone]]:
        if self._quiet:  # about to re-exec: the new image answers in a moment
            return []
        ready = [w for w in (self.workers if workers is None else workers) if w.ready]
        replies = await asyncio.gather(*(w.request(command, timeout_s) for w in ready),
                                       return_exceptions=True)
        for r in replies:
            if isinstance(r, BaseException) and not isinstance(r, WorkerGone):
                raise r
        return list(zip(ready, replies))

    async def handle_command(self, command: str) -> dict:
        if command in ("reload", "reload new-workers"):
            ok, message = await self.reload(new_workers=command.endswith("new-workers"))
            return control.reload_reply(ok, message, self.generation, self.config.digest)
        if command == "status":
            return {"ok": True, **await self.status()}
        return {"ok": False, "error": f"unknown command {command[:60]!r}"}

    async def reload(self, new_workers: bool = False) -> tuple[bool, str]:
        """Validate once, then have every worker apply the file; (ok, message). When the
        code on disk is not the code running (or ``new_workers``), start a new generation
        of workers on it instead (:meth:`_upgrade`)."""
        if self._stop.is_set():
            return False, "stopping: reload refused"
        async with self._reload_lock:
            if self._stop.is_set():
                return False, "stopping: reload refused"
            notify("RELOADING=1", "STATUS=reloading")
            try:
                new = await asyncio.to_thread(configmod.load, self.config_path)
            except configmod.ConfigError as e:
                return self._reload_failed(f"reload of {self.config_path} failed, "
                                           f"still serving generation {self.generation}:\n{e}")
            old_config = self.config
            on_disk = await asyncio.to_thread(code.identify)
            if new_workers or on_disk["digest"] != self.code["digest"]:
                return await self._upgrade(new)
            ready = [w for w in self.workers if w.ready]
            replies = await self._gather("prepare " + new.raw.decode(), RELOAD_TIMEOUT_S, ready)
            failed = [f"{w}: {r}" if isinstance(r, WorkerGone) else f"{w}: {r.get('error')}"
                      for w, r in replies if isinstance(r, WorkerGone) or not r.get("ok")]
            failed += [f"{w}: no longer running" for w in ready
                       if w not in {x for x, _ in replies}]
            if failed or self._stop.is_set():
                await self._gather("abort", RELOAD_TIMEOUT_S, ready)
                why = "\n".join(failed) or "the proxy is stopping: reload refused"
                return self._reload_failed(
                    f"reload of {self.config_path} failed in {len(failed)} of {len(ready)} "
                    f"workers, still serving generation {self.generation} in all:\n{why}")
            self.config = new  # (a worker started from here on gets it)
            commits = await self._gather("commit", RELOAD_TIMEOUT_S, ready)
            for w, r in commits:  # only a worker that died can fail here: replaced, on `new`
                if isinstance(r, WorkerGone) or not r.get("ok"):
                    log.error("%s: commit failed (%s); it is replaced on the new config", w, r)
                    w.kill()
            change = configmod.diff(old_config, new)
            self.generation += 1
            self.apply_checks(new)
            self.reloads["ok"] += 1
            message = (f"reloaded to generation {self.generation} ({new.summary()}) "
                       f"in {len(ready)} workers: {change}")
            log.info("%s", message)
            notify("READY=1", f"STATUS={self.status_line()}")
            return True, message

    # -- worker generations: an upgrade without dropping a connection --------------------

    async def _upgrade(self, new: configmod.Config) -> tuple[bool, str]:
        """Start a new generation of workers on the code on disk and ``new``; once every
        one is ready, the old generation stops accepting and drains (``--drain-time``).
        The code is tried in a child first; any failure leaves the old generation serving,
        untouched."""
        try:
            ran = await asyncio.to_thread(code.preflight, new.raw, self.config_path)
        except code.PreflightError as e:
            return self._reload_failed(f"upgrade refused, still serving generation "
                                       f"{self.generation} (code {self.code['version']}):\n{e}")
        if ran["digest"] != self.image["digest"]:  # this process runs the old code too
            return await self._reexec(new)
        return await self._new_generation(new, ran)

    async def _new_generation(self, new: configmod.Config, ran: dict) -> tuple[bool, str]:
        if self._stop.is_set():
            return self._reload_failed(f"upgrade to {ran['version']} not started: stopping")
        number = self.worker_generation + 1
        fresh = [Worker(i, number) for i in range(len(self.workers))]
        old_config = self.config
        self.config, self.generation = new, self.generation + 1  # what the new ones start on
        started = await asyncio.gather(*(self._start(w) for w in fresh), return_exceptions=True)
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors or self._stop.is_set():
            for w in fresh:
                w.kill()
            await asyncio.gather(*(w.proc.wait() for w in fresh if w.proc is not None))
            for w in fresh:
                w.close_channel()
            self.config, self.generation = old_config, self.generation - 1
            why = "stopping" if not errors else str(errors[0])
            return self._reload_failed(f"upgrade to {ran['version']} failed, still serving "
                                       f"generation {self.generation}: {why}")
        old = Generation(self.worker_generation, self.code, self.workers)
        self.workers, self.worker_generation, self.code = fresh, number, ran
        self.apply_checks(new)
        for w in fresh:
            self._spawn(self._keep(w))
            self._spawn(self._heartbeat(w))
        self._retire(old)
        self.reloads["ok"] += 1
        message = (f"upgraded to {ran['version']} (code {ran['digest']}): worker generation "
                   f"{number} serves {new.summary()} with {len(fresh)} workers; generation "
                   f"{old.number} drains for up to {self.settings.drain_time_s:g}s")
        log.info("%s", message)
        notify("READY=1", f"STATUS={self.status_line()}")
        return True, message

    # -- re-executing the supervisor (reexec.py) -------------------------------------------

    async def _reexec(self, new: configmod.Config) -> tuple[bool, str]:
        """Hand everything to a new image of this process on the code on disk, which starts
        the new generation and answers the reload; returns only if the exec failed."""
        self._quiet = True
        try:
            async with asyncio.timeout(5):  # answers under way (not drains: those go on)
                while any(w.busy() for w in self.all_workers()):
                    await asyncio.sleep(0.01)  # (replies arrive on other tasks: poll them)
        except TimeoutError:
            self._quiet = False
            return self._reload_failed("upgrade not started: a worker did not answer a "
                                       "request within 5s; nothing changed, try again")
        client = control.current_client.get()
        state = self._state(new, reexec.inheritable(os.dup(client)) if client is not None
                            else None)
        log.info("upgrading: re-executing the supervisor (pid %d) on the code on disk",
                 os.getpid())
        try:
            reexec.exec_self(reexec.save(state), _package_parent())
        except OSError as e:
            self._quiet = False
            return self._reload_failed(f"upgrade failed: cannot re-execute: {e}")
        raise AssertionError("unreachable")  # (exec_self returns only by raising)

    def _state(self, new: configmod.Config, reply_fd: int | None) -> dict:
        """What the next image needs, with the fds it inherits (made inheritable here)."""
        def fd(sock) -> int:
            return reexec.inheritable(sock.fileno())

        def worker(w: Worker) -> dict:
            return {"index": w.index, "generation": w.generation, "pid": w.proc.pid,
                    "channel": reexec.inheritable(os.dup(w.channel_fd())), "ids": w.ids,
                    "ready": w.ready, "draining": w.draining}

        return {
            "config_path": self.config_path, "config": self.config.raw.decode(),
            "generation": self.generation, "worker_generation": self.worker_generation,
            "code": self.code, "reloads": self.reloads, "restarts": self.restarts,
            "retired": self._retired_counts(),
            "sockets": [fd(s) for s in self.sockets], "group": [fd(s) for s in self.group],
            "control": fd(self.control_server.sockets[0]) if self.control_server else None,
            "metrics": fd(self.metrics_http.sock) if self.metrics_http is not None else None,
            "workers": [worker(w) for w in self.workers],
            "old": [{"number": g.number, "code": g.code, "since": g.since,
                     "workers": [worker(w) for w in g.workers]} for g in self.old],
            "upgrade": {"config": new.raw.decode(), "reply": reply_fd},
        }

    def resume(self, state: dict) -> None:
        """Carry on from the state a previous image of this process handed over."""
        from ..dataplane import listeners
        from ..metrics import Metrics

        self.resumed = state
        self.generation, self.worker_generation = state["generation"], state["worker_generation"]
        self.code, self.reloads, self.restarts = state["code"], state["reloads"], state["restarts"]
        self.retired = Metrics.merged(state["retired"]) if state["retired"] else None
        self.group = [listeners.from_fd(fd) for fd in state["group"]]
        if state["metrics"] is not None:
            from ..metrics_http import MetricsServer
            self.metrics_http = MetricsServer(socket.socket(fileno=state["metrics"]),
                                              self.render_metrics)

    def _handed(self, what: str):
        """A listening socket the previous image handed over (control, metrics), or None."""
        if self.resumed is None or self.resumed.get(what) is None:
            return None
        return socket.socket(fileno=self.resumed[what])

    async def _adopt(self, state: dict) -> None:
        """Take over the workers of the image before this one (still our children)."""
        async def worker(row: dict) -> Worker:
            w = Worker(row["index"], row["generation"])
            w.proc = reexec.Adopted(row["pid"])
            w.ids = row["ids"]
            w.attach(*await asyncio.open_connection(sock=socket.socket(fileno=row["channel"]),
                                                    limit=CHANNEL_LIMIT))
            w.ready, w.draining = row["ready"], row["draining"]
            return w

        self.workers = [await worker(row) for row in state["workers"]]
        for row in state["old"]:
            g = Generation(row["number"], row["code"], [await worker(r) for r in row["workers"]])
            g.since = row["since"]
            self.old.append(g)
            for w in g.workers:  # their drain goes on; its answer comes to this image
                remaining = max(0.0, g.since + self.settings.drain_time_s - time.time())
                self._spawn(self._drain(w, remaining))
                self._spawn(self._heartbeat(w))
        log.info("re-executed on code %s (%s); adopted %d workers of generation %d and %d "
                 "draining", self.image["version"], self.image["digest"], len(self.workers),
                 self.worker_generation, sum(len(g.workers) for g in self.old))

    async def _finish_upgrade(self, upgrade: dict) -> None:
        """In the re-executed image: start the new generation, answer the reload."""
        async with self._reload_lock:
            try:
                new = configmod.loads(upgrade["config"].encode(), self.config_path)
                ok, message = await self._new_generation(new, self.image)
            except Exception as e:  # a bug: still answer, and the old generation serves
                log.exception("upgrade failed")
                ok, message = self._reload_failed(f"upgrade failed (internal error: {e!r})")
        if upgrade["reply"] is not None:
            reply = control.reload_reply(ok, message, self.generation, self.config.digest)
            with socket.socket(fileno=upgrade["reply"]) as client:
                client.setblocking(True)
                client.settimeout(5)
                try:
                    client.sendall(json.dumps(reply).encode() + b"\n")
                except OSError as e:
                    log.warning("could not answer the reload's client: %s", e)

    def _retire(self, generation: Generation) -> None:
        """``generation`` stops accepting and drains; past MAX_GENERATIONS the oldest
        draining one is closed now."""
        generation.since = time.time()
        self.old.append(generation)
        for w in generation.workers:
            w.draining = True
            self._spawn(self._drain(w, self.settings.drain_time_s))
        while len(self.old) + 1 > MAX_GENERATIONS:
            oldest = self.old.pop(0)
            log.warning("more than %d worker generations: closing generation %d's %d workers "
                        "now", MAX_GENERATIONS, oldest.number, len(oldest.workers))
            for w in oldest.workers:
                self._spawn(self._drain(w, 0))

    async def _drain(self, w: Worker, drain_s: float) -> None:
        """Tell ``w`` to drain; its last counts are kept (counters never go back); then
        it exits and is forgotten."""
        try:
            reply = await w.request(f"drain {drain_s:g}", drain_s + PING_TIMEOUT_S + 15)
            if reply.get("metrics"):
                self._keep_counts(reply["metrics"])
        except WorkerGone as e:
            log.error("%s", e)
        if w.proc is not None:
            await w.proc.wait()
        w.close_channel()
        for g in list(self.old):
            if w in g.workers:
                g.workers.remove(w)
                if not g.workers:
                    self.old.remove(g)
                    log.info("worker generation %d finished draining", g.number)

    def _keep_counts(self, snapshot: dict) -> None:
        from ..metrics import Metrics

        self.retired = Metrics.merged(self._retired_counts() + [_counts_only(snapshot)])

    def _retired_counts(self) -> list[dict]:
        return [_counts_only(self.retired.snapshot())] if self.retired is not None else []

    def _reload_failed(self, message: str) -> tuple[bool, str]:
        self.reloads["failed"] += 1
        log.error("%s", message)
        notify("READY=1", f"STATUS=reload failed; {self.status_line()}")
        return False, message

    def status_line(self) -> str:
        return (f"generation {self.generation}: {self.config.summary()}, "
                f"{sum(w.ready for w in self.workers)}/{len(self.workers)} workers")

    async def status(self) -> dict:
        """Every worker's status, summed: connection counts add up; a target's health is
        shown per worker where the workers (which eject targets on their own) disagree."""
        # the checks' state as it is before the workers are asked: a change told to them
        # already went down their channels ahead of this request, so a target shown down
        # here is one every ready worker already treats as down
        checks = {(r["app"], r["target"]): r for r in self.checker.state()}
        everyone = [(w, r) for w, r in await self._gather("status", workers=self.all_workers())
                    if isinstance(r, dict)]
        replies = [(w, r) for w, r in everyone if not w.draining]
        now = time.monotonic()
        workers = [{"index": w.index, "pid": w.proc.pid if w.proc else None,
                    "ready": w.ready, "active": 0, "fds": None, "failing": w.failing,
                    "retry_in_s": (round(max(0.0, w.retry_at - now), 1)
                                   if w.retry_at is not None else None)}
                   for w in self.workers]
        status = {"config": self.config_path, "digest": self.config.digest,
                  "generation": self.generation, "mode": "per-port", "active": 0,
                  "accepting": bool(replies), "workers": workers, "restarts": self.restarts,
                  "group": ("[%s]:%d" % self.group[0].getsockname()[:2]) if self.group else None,
                  "version": self.code["version"], "code": self.code["digest"],
                  "generations": self._generations(everyone)}
        apps: dict[str, dict] = {}
        for w, r in replies:
            status["mode"] = r["mode"]
            status["active"] += r["active"]
            status["accepting"] = status["accepting"] and r["accepting"]
            workers[w.index]["active"] = r["active"]
            workers[w.index]["fds"] = r.get("fds")
            workers[w.index]["digest"] = r.get("digest")  # the config it serves: all agree
            for a in r["apps"]:
                merged = apps.setdefault(a["name"], {**a, "active": 0, "held_down": {},
                                                     "targets": [{"target": t["target"],
                                                                  "health": {}}
                                                                 for t in a["targets"]]})
                merged["active"] += a["active"]
                merged["held_down"][w.index] = a["held_down"]  # each worker's, to compare
                health = {t["target"]: t["health"] for t in a["targets"]}
                for t in merged["targets"]:
                    t["health"][w.index] = health.get(t["target"], "?")
        for a in apps.values():
            for t in a["targets"]:
                seen = set(t["health"].values())
                t["health"] = (seen.pop() if len(seen) == 1 else
                               "; ".join(f"worker {i}: {h}" for i, h in sorted(t["health"].items())))
        for a in apps.values():
            for t in a["targets"]:
                if (a["name"], t["target"]) in checks:
                    t["check"] = checks[(a["name"], t["target"])]
        status["apps"] = list(apps.values())
        from ..metrics import merged_names
        status["names"] = merged_names([r.get("names", []) for _, r in replies])
        return status

    def _generations(self, replies: list) -> list[dict]:
        """Each worker generation, the serving one last: its code, pids, open connections
        and since when it drains."""
        active = {w: r.get("active", 0) for w, r in replies}
        current = Generation(self.worker_generation, self.code, self.workers)
        current.since = None
        return [{"generation": g.number, "version": g.code["version"], "code": g.code["digest"],
                 "pids": [w.proc.pid for w in g.workers if w.proc is not None],
                 "active": sum(active.get(w, 0) for w in g.workers),
                 "draining_since": g.since} for g in [*self.old, current]]

    # -- metrics: gathered from the workers at scrape time ---------------------------------

    def serve_metrics(self) -> None:
        """Bind the metrics endpoint (before :meth:`serve`, so a bad address fails early)."""
        from .. import metrics as metricsmod

        if self.metrics_address:
            self.metrics_http = metricsmod.endpoint(self.metrics_address, self.render_metrics)

    async def render_metrics(self) -> bytes:
        """A scrape: every worker's counts, gathered now and summed (a worker that does not
        answer in time is left out, and replaced: see workers.py)."""
        from ..metrics import exposition

        return exposition(_GatheredMetrics(self, await self.gather_metrics()))

    async def gather_metrics(self):
        from ..metrics import Metrics

        replies = [(w, r["metrics"]) for w, r in await self._gather(
            "metrics", METRICS_TIMEOUT_S, self.all_workers()) if isinstance(r, dict) and r.get("ok")]
        snaps = [snap for _, snap in replies]
        total = Metrics.merged(snaps + self._retired_counts())  # (counters never go back)
        by_generation: dict[int, int] = {}
        for w, snap in replies:
            by_generation[w.generation] = (by_generation.get(w.generation, 0)
                                           + sum(v for _, v in snap["active_n"]))
        total.active_by_generation = by_generation
        total.reloads_n = dict(self.reloads)  # one reload is one, however many workers
        total.generation = self.generation
        return total


def _counts_only(snapshot: dict) -> dict:
    """A worker's snapshot without what is not a count of the past (open connections,
    fds, DNS names)."""
    return {**snapshot, "active_n": [], "dns_names": [], "fds": None}


class Generation:
    """A generation of workers: started together on one code; draining once a newer one
    serves."""

    def __init__(self, number: int, code: dict, workers: list[Worker]) -> None:
        self.number, self.code, self.workers = number, code, workers
        self.since: float | None = None  # draining since (Unix time)

    def __repr__(self) -> str:
        return f"<Generation {self.number} {self.code['version']} workers={len(self.workers)}>"


def _package_parent() -> str:
    """The directory holding the ``appliance`` package on disk (what a new process runs)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _GatheredMetrics:
    """A prometheus_client collector: the workers' summed counts, and the supervisor's own."""

    def __init__(self, supervisor: Supervisor, total) -> None:
        self.supervisor = supervisor
        self.total = total

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        sup = self.supervisor
        yield from self.total.collect()
        workers = GaugeMetricFamily("flyproxy_workers", "Worker processes serving now")
        workers.add_metric([], sum(w.ready for w in sup.workers))
        yield workers
        restarts = CounterMetricFamily("flyproxy_worker_restarts",
                                       "Workers started again after they exited")
        restarts.add_metric([], sup.restarts)
        yield restarts
        generations = GaugeMetricFamily(
            "flyproxy_generation_connections_active", "Connections open now, by worker "
            "generation (an older one is draining after an upgrade)", labels=["generation"])
        for number, active in sorted(getattr(self.total, "active_by_generation", {}).items()):
            generations.add_metric([str(number)], active)
        yield generations
        failing = GaugeMetricFamily("flyproxy_workers_failing",
                                    f"Workers that exited more than {RESTARTS} times in "
                                    f"{RESTART_WINDOW_S:g} s (started again every "
                                    f"{MAX_BACKOFF_S:g} s while the others serve)")
        failing.add_metric([], sum(w.failing is not None for w in sup.workers))
        yield failing
        from ..dataplane.checks import check_families
        yield from check_families(sup.checker.state())
