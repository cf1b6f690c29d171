"""Worker processes under a supervisor: N workers sharing the listeners.

One event loop uses one core, and a new connection costs a Python proxy more CPU than it
costs HAProxy; ``flyproxy serve --workers N`` spreads connections over N processes. The
unit always runs a supervisor (``--supervisor yes``), even with one worker: it is what
upgrades without dropping a connection (``generations.py``). Its lifecycle is the single
process's (``lifecycle.py``); what it shows is gathered from the workers (``gathered.py``).

The supervisor is the service's main process. It validates the config, holds the
listening sockets (handed in by systemd, or bound for ``--listen``), and starts each
worker (``workers.py``) with those sockets:

- per-port mode: every worker binds every port with SO_REUSEPORT and the kernel spreads
  new connections over them by hash;
- handed-in sockets are shared: every worker accepts on them. They alone would balance
  badly (whichever worker wakes first takes a whole burst), and one queue for every app
  lets a flood on one fill it for all. So the supervisor also makes *lanes*
  (listeners.LANES of them): each a group of one listening socket per worker, bound
  together with SO_REUSEPORT on an ephemeral port. ``flyproxy bpf register --spread``
  puts a member of each in the BPF program's lanes map, and the program sends an app's
  connections to lane (app index % LANES): each app has accept queues of its own, and the
  kernel picks the member (the worker) by a hash of each connection. The supervisor keeps
  every member open, so a restarted worker gets its members back and connections hashed
  to it wait in its queues meanwhile;
- the control socket, SIGHUP and the metrics endpoint fan out over the workers' channels:
  a reload reads and validates the file once and sends those bytes to every worker,
  prepared everywhere, then committed (any failure aborts all); status and metrics are
  gathered and summed; health check changes are sent as coalesced deltas;
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
import dataclasses
import logging
import signal
import socket
import time

from .. import config as configmod
from ..settings import ServeConfig
from ..statuspage import StatusPage
from . import code, control, reexec
from .gathered import Gathered
from ..dataplane import limits
from .generations import MAX_GENERATIONS, Generation, Generations
from .health import HostChecks
from .lifecycle import Service
from .systemd import notify
from .workers import (MAX_BACKOFF_S, PING_TIMEOUT_S, RELOAD_TIMEOUT_S, REQUEST_TIMEOUT_S,
                      RESTART_WINDOW_S, RESTARTS, Worker, WorkerGone)

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0  # a worker binds every port (thousands, per-port mode) and imports
HEARTBEAT_S = 1.0  # each worker is pinged this often; one that misses PING_TIMEOUT_S is replaced


class Supervisor(Generations, Gathered, Service):
    def __init__(self, config: configmod.Config, settings: ServeConfig,
                 sockets: list[socket.socket]) -> None:
        super().__init__(settings)  # (serve --watch: one for all)
        self.checks: HostChecks | None = None  # one set for the host, told to every worker
        self.config = config
        self.generation = 1  # of the config
        self.workers = [Worker(i) for i in range(settings.workers)]  # the serving generation
        self.worker_generation = 1
        self.code = code.identify()  # what the serving workers run
        self.image = self.code  # what this process imported (re-exec when it is stale)
        self.old: list[Generation] = []  # older generations, draining
        self.retired = None  # the counts of workers that finished draining (Metrics)
        self.sockets = sockets
        # with handed-in sockets: lanes[lane][worker index], a listening socket each
        self.lanes: list[list[socket.socket]] = []
        self.control_server: asyncio.AbstractServer | None = None
        self.metrics_http = None  # the /metrics endpoint, bound by serve_metrics()
        self.reloads = {"ok": 0, "failed": 0}
        self.restarts = 0
        self._reload_lock = asyncio.Lock()
        self.resumed: dict | None = None  # the state a previous image handed over
        self._quiet = False  # about to re-exec: no new request to a worker
        # The connection limits' counts, shared by every worker (dataplane/limits.py): a
        # column each, for as many workers as MAX_GENERATIONS generations can hold
        self.limits: limits.Table | None = None
        self._free_columns: set[int] = set()

    def __repr__(self) -> str:
        return f"<Supervisor {self.config_path} workers={len(self.workers)}>"

    # -- lifecycle ---------------------------------------------------------------------

    def make_group(self) -> None:
        """With handed-in sockets: the lanes, each one SO_REUSEPORT listener per worker on
        an ephemeral port (dual-stack on every address, as the BPF program assigns both
        families to it; connections that reach one directly find no app for its port and
        are closed)."""
        from ..dataplane import listeners

        if not self.sockets:
            return
        made: list[list[socket.socket]] = []
        try:
            for _ in range(listeners.LANES):
                first = listeners.bind(0, None, reuse_port=True)
                host, port = first.getsockname()[:2]
                made.append([first] + [listeners.bind(port, host, reuse_port=True)
                                       for _ in self.workers[1:]])
        except BaseException:
            for lane in made:
                for s in lane:
                    s.close()
            raise
        self.lanes = made
        log.info("%d lanes of %d listeners each, the first on [%s]:%d (spread by flyproxy bpf "
                 "register --spread)", len(made), len(self.workers), *made[0][0].getsockname()[:2])

    async def startup(self) -> bool:
        self.install_signals()
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
            self._exit = 1
            return False
        self.checks = HostChecks(self.settings, self._checks_changed)
        self.checks.apply(self.config)
        for w in self.workers:
            self.spawn(self._keep(w))
            self.spawn(self._heartbeat(w))
        if self.settings.control:
            self.control_server = await control.start(self, self.settings.control,
                                                      sock=self._handed("control"))
        if self.metrics_http is not None:  # (bound by serve_metrics, or handed over)
            self.metrics_http.page = StatusPage(self.status, self.gather_metrics)  # GET /
            await self.metrics_http.start()
        if self.resumed is not None and self.resumed.get("upgrade"):
            self.spawn(self._finish_upgrade(self.resumed["upgrade"]))
        self.start_watcher(lambda: self.config.digest)
        pids = ", ".join(str(w.proc.pid) if w.proc else "-" for w in self.workers)
        log.info("serving %s with %d workers (pids %s)", self.config.summary(),
                 len(self.workers), pids)
        return True

    def stop_accepting(self) -> None:
        self.checks.close()
        for lane in self.lanes:  # once the workers close theirs, the lanes are gone and
            for member in lane:  # the BPF program sends new connections to the listener
                member.close()
        if self.control_server is not None:
            self.control_server.close()
            control.remove(self.settings.control)
        if self.metrics_http is not None:
            self.metrics_http.close()
        for w in self.all_workers():  # each stops accepting at once, then drains
            w.terminate()

    async def shutdown(self) -> None:
        await self._shutdown()

    def stop_now(self) -> None:
        for w in self.all_workers():  # (each closes all its connections at a second SIGTERM)
            w.signal(signal.SIGTERM)

    # -- active health checks (health.py): the host's, told to every worker -----------------

    def _checks_changed(self, changes) -> None:
        """Targets changed state: every worker is told, each in one message at a time, the
        changes since its last (coalesced: a target that flapped is sent once, as it is)."""
        for w in self.workers:
            w.health_pending.update(((app, target), up) for app, target, up in changes)
            if w.ready and not w.health_sending:
                self.spawn(self._send_health(w))

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

    # -- workers ---------------------------------------------------------------------

    def _fds(self, w: Worker) -> list[int]:
        """The sockets worker ``w`` serves: every handed-in one, and its member of each lane."""
        own = [lane[w.index].fileno() for lane in self.lanes]
        return [s.fileno() for s in self.sockets] + own

    def _worker_settings(self, w: Worker) -> ServeConfig:
        """Worker ``w`` is ``flyproxy serve`` with exactly our options (settings.py), but
        for what only the supervisor does (the control socket, the metrics endpoint:
        the worker collects, --watch) and the sockets it hands over."""
        return dataclasses.replace(
            self.settings, fd=tuple(self._fds(w)), listen=None, control=None, metrics=None,
            watch=False, collect_metrics=bool(self.settings.metrics),
            generation=self.generation, resume_fd=None,
            limits=f"{self.limits.fd}:{w.column}" if self.limits is not None else None)

    def _open_limits(self, fd: int | None = None) -> None:
        """The limits table: made now, or the one a previous image handed over (``fd``)."""
        columns = MAX_GENERATIONS * len(self.workers)
        if fd is None:
            fd = limits.create(columns)
        self.limits = limits.Table(fd, 0)
        self._free_columns = set(range(self.limits.columns))

    def _column(self, w: Worker) -> None:
        """Give ``w`` a column of the limits table (kept across its restarts), zeroed: what
        a previous process counted there died with it."""
        if self.limits is None:
            self._open_limits()
        if w.column is None:
            w.column = min(self._free_columns)  # (never empty: MAX_GENERATIONS bounds workers)
            self._free_columns.discard(w.column)
        self.limits.clear(w.column)

    def _free_column(self, w: Worker) -> None:
        """``w`` is gone for good: its column is zeroed and free for another."""
        if w.column is not None and self.limits is not None:
            self.limits.clear(w.column)
            self._free_columns.add(w.column)
            w.column = None

    async def _start(self, w: Worker) -> None:
        self._column(w)
        await w.start(self._worker_settings(w), self.config.raw)
        try:
            await w.request("status", STARTUP_TIMEOUT_S)
            if self.checks is not None:  # a replacement: what is down now, all of it
                from ..dataplane.checks import encode_changes
                w.health_pending = {}  # (changes from here on are sent once it is ready)
                await w.request(encode_changes(self.checks.down_changes(), reset=True),
                                STARTUP_TIMEOUT_S)
        except WorkerGone:
            code = await w.proc.wait()
            w.close_channel()
            raise WorkerGone(f"{w} exited with status {code} before it was ready "
                             "(its error is logged above)") from None
        w.ready = True
        if w.health_pending:
            self.spawn(self._send_health(w))

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
                if self.limits is not None:  # its connections died with it
                    self.limits.clear(w.column)
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
            try:
                async with self._reload_lock:  # on the config in force, not one half-applied
                    if w.draining or self._stop.is_set():
                        return  # an upgrade made it old meanwhile, or we are stopping
                    self.restarts += 1
                    await self._start(w)
            except WorkerGone as e:
                log.error("%s", e)
                continue  # counted as an exit on the next pass
            except Exception as e:  # fork or fds refused (EAGAIN, EMFILE): try again later
                log.error("%s could not be started: %r", w, e)
                continue
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

    def all_workers(self) -> list[Worker]:
        """The serving generation's workers and every draining one's."""
        return [w for g in self.old for w in g.workers] + self.workers

    async def _shutdown(self) -> None:
        """SIGTERM every worker of every generation and wait for them (bounded: then they
        are killed): the supervisor never exits while a worker holds connections."""
        workers = self.all_workers()
        for w in workers:
            w.terminate()
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
                return self.reload_failed(f"reload of {self.config_path} failed, "
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
                return self.reload_failed(
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
            self.checks.apply(new)
            return self.reloaded(f"reloaded to generation {self.generation} ({new.summary()}) "
                                 f"in {len(ready)} workers: {change}")

    def count_reload(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def status_line(self) -> str:
        return (f"generation {self.generation}: {self.config.summary()}, "
                f"{sum(w.ready for w in self.workers)}/{len(self.workers)} workers")
