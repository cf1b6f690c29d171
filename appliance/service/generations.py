"""Worker generations: an upgrade without dropping a connection (the supervisor's part).

A reload that finds the code on disk changed (``code.py``), or ``reload --new-workers``,
is an *upgrade*:

1. the code on disk is tried in a child (``code.preflight``): a broken install fails the
   reload there, and nothing changes;
2. if this process runs the old code too, it re-executes itself in place (``reexec.py``:
   same PID, the workers adopted, signals blocked across the exec); the new image goes on
   from 3 and answers the reload's client;
3. a new generation of workers starts on the new code and the config in force (the
   listening sockets and the BPF group members are the supervisor's: the new workers get
   the same ones, so no socket closes and nothing needs registering again); if any fails
   to start, they are stopped and the old generation serves on, untouched;
4. the old generation stops accepting and drains: its workers answer ``drain`` once their
   last connection ended or ``--drain-time`` passed (what is left then is closed, a log
   line each), with their last counts, which the supervisor keeps so counters never go
   back. At most ``MAX_GENERATIONS`` at once: past that the oldest is closed now.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time

from .. import config as configmod
from . import code, control, reexec
from .workers import CHANNEL_LIMIT, PING_TIMEOUT_S, Worker, WorkerGone

log = logging.getLogger(__name__)

MAX_GENERATIONS = 4  # worker generations at once (serving + draining); the oldest is closed


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


class Generations:
    """The Supervisor's upgrades (a mixin: it uses the supervisor's workers, config, locks
    and lifecycle)."""

    async def _upgrade(self, new: configmod.Config) -> tuple[bool, str]:
        """Start a new generation of workers on the code on disk and ``new``; once every
        one is ready, the old generation stops accepting and drains (``--drain-time``).
        The code is tried in a child first; any failure leaves the old generation serving,
        untouched."""
        try:
            ran = await asyncio.to_thread(code.preflight, new.raw, self.config_path,
                                          ["serve", *self.settings.to_argv()])
        except code.PreflightError as e:
            return self.reload_failed(f"upgrade refused, still serving generation "
                                       f"{self.generation} (code {self.code['version']}):\n{e}")
        if ran["digest"] != self.image["digest"]:  # this process runs the old code too
            return await self._reexec(new)
        return await self._new_generation(new, ran)

    async def _new_generation(self, new: configmod.Config, ran: dict) -> tuple[bool, str]:
        if self._stop.is_set():
            return self.reload_failed(f"upgrade to {ran['version']} not started: stopping")
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
                self._free_column(w)
            self.config, self.generation = old_config, self.generation - 1
            why = "stopping" if not errors else str(errors[0])
            return self.reload_failed(f"upgrade to {ran['version']} failed, still serving "
                                       f"generation {self.generation}: {why}")
        old = Generation(self.worker_generation, self.code, self.workers)
        self.workers, self.worker_generation, self.code = fresh, number, ran
        self.checks.apply(new)
        for w in fresh:
            self.spawn(self._keep(w))
            self.spawn(self._heartbeat(w))
        self._retire(old)
        return self.reloaded(f"upgraded to {ran['version']} (code {ran['digest']}): worker "
                             f"generation {number} serves {new.summary()} with {len(fresh)} "
                             f"workers; generation {old.number} drains for up to "
                             f"{self.settings.drain_time_s:g}s")

    def _retire(self, generation: Generation) -> None:
        """``generation`` stops accepting and drains; past MAX_GENERATIONS the oldest
        draining one is closed now."""
        generation.since = time.time()
        self.old.append(generation)
        for w in generation.workers:
            w.draining = True
            self.spawn(self._drain(w, self.settings.drain_time_s))
        while len(self.old) + 1 > MAX_GENERATIONS:
            oldest = self.old.pop(0)
            log.warning("more than %d worker generations: closing generation %d's %d workers "
                        "now", MAX_GENERATIONS, oldest.number, len(oldest.workers))
            for w in oldest.workers:  # (its drain, under way, keeps its counts once)
                self.spawn(self._hurry(w))

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
        self._free_column(w)
        for g in list(self.old):
            if w in g.workers:
                g.workers.remove(w)
                if not g.workers:
                    self.old.remove(g)
                    log.info("worker generation %d finished draining", g.number)

    async def _hurry(self, w: Worker) -> None:
        """Close a draining worker's connections now (too many generations)."""
        try:
            await w.request("drain 0", PING_TIMEOUT_S + 15)
        except WorkerGone:
            pass  # gone already

    def _keep_counts(self, snapshot: dict) -> None:
        from ..metrics import Metrics

        self.retired = Metrics.merged(self._retired_counts() + [_counts_only(snapshot)])

    def _retired_counts(self) -> list[dict]:
        return [_counts_only(self.retired.snapshot())] if self.retired is not None else []

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

    # -- re-executing the supervisor (reexec.py) -------------------------------------------

    async def _reexec(self, new: configmod.Config) -> tuple[bool, str]:
        """Hand everything to a new image of this process on the code on disk, which starts
        the new generation and answers the reload; returns only if the exec failed."""
        self._quiet = True
        try:
            return await self._reexec_quiet(new)
        finally:  # (only reached when the exec did not happen)
            self._quiet = False

    async def _reexec_quiet(self, new: configmod.Config) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(5):  # answers under way (not drains: those go on)
                while any(w.busy() for w in self.all_workers()):
                    await asyncio.sleep(0.01)  # (replies arrive on other tasks: poll them)
        except TimeoutError:
            return self.reload_failed("upgrade not started: a worker did not answer a "
                                       "request within 5s; nothing changed, try again")
        client = control.current_client.get()
        state = self._state(new, reexec.inheritable(os.dup(client)) if client is not None
                            else None)
        log.info("upgrading: re-executing the supervisor (pid %d) on the code on disk",
                 os.getpid())
        # the new image: this supervisor's options, its sockets from the state
        again = dataclasses.replace(self.settings, fd=(), listen=None,
                                    resume_fd=reexec.save(state))
        try:
            reexec.exec_self(code.command(["serve", *again.to_argv()]))
        except OSError as e:
            return self.reload_failed(f"upgrade failed: cannot re-execute: {e}")
        raise AssertionError("unreachable")  # (exec_self returns only by raising)

    def _state(self, new: configmod.Config, reply_fd: int | None) -> dict:
        """What the next image needs, with the fds it inherits (made inheritable here)."""
        def fd(sock) -> int:
            return reexec.inheritable(sock.fileno())

        def worker(w: Worker) -> dict:
            running = (w.proc is not None and w.proc.returncode is None
                       and w.has_channel())
            return {"index": w.index, "generation": w.generation,
                    "pid": w.proc.pid if running else None,  # (down: the next image starts it)
                    "channel": reexec.inheritable(os.dup(w.channel_fd())) if running else None,
                    "ids": w.ids, "ready": w.ready and running, "draining": w.draining,
                    "column": w.column}

        return {
            "config_path": self.config_path, "config": self.config.raw.decode(),
            "generation": self.generation, "worker_generation": self.worker_generation,
            "code": self.code, "reloads": self.reloads, "restarts": self.restarts,
            "retired": self._retired_counts(),
            "sockets": [fd(s) for s in self.sockets],
            "lanes": [[fd(s) for s in lane] for lane in self.lanes],
            "control": fd(self.control_server.sockets[0]) if self.control_server else None,
            "metrics": fd(self.metrics_http.sock) if self.metrics_http is not None else None,
            "workers": [worker(w) for w in self.workers],
            "old": [{"number": g.number, "code": g.code, "since": g.since,
                     "workers": [row for row in map(worker, g.workers) if row["pid"]]}
                    for g in self.old],
            "upgrade": {"config": new.raw.decode(), "reply": reply_fd},
            "limits": reexec.inheritable(self.limits.fd) if self.limits is not None else None,
        }

    def resume(self, state: dict) -> None:
        """Carry on from the state a previous image of this process handed over."""
        from ..dataplane import listeners
        from ..metrics import Metrics

        self.resumed = state
        self.generation, self.worker_generation = state["generation"], state["worker_generation"]
        self.code, self.reloads, self.restarts = state["code"], state["reloads"], state["restarts"]
        self.retired = Metrics.merged(state["retired"]) if state["retired"] else None
        lanes = state.get("lanes")
        if lanes is None:  # an image from before lanes: its one group
            lanes = [state["group"]] if state.get("group") else []
        self.lanes = [[listeners.from_fd(fd) for fd in lane] for lane in lanes]
        if state.get("limits") is not None:  # (an image from before limits had none)
            self._open_limits(state["limits"])
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
            w.ids = row["ids"]
            w.draining = row["draining"]
            if row.get("column") is not None and self.limits is not None:
                w.column = row["column"]
                self._free_columns.discard(w.column)
            if row["pid"] is None:  # was down: _keep starts it
                return w
            w.proc = reexec.Adopted(row["pid"])
            w.attach(*await asyncio.open_connection(sock=socket.socket(fileno=row["channel"]),
                                                    limit=CHANNEL_LIMIT))
            w.ready = row["ready"]
            return w

        self.workers = [await worker(row) for row in state["workers"]]
        for row in state["old"]:
            g = Generation(row["number"], row["code"], [await worker(r) for r in row["workers"]])
            g.since = row["since"]
            self.old.append(g)
            for w in g.workers:  # their drain goes on; its answer comes to this image
                remaining = max(0.0, g.since + self.settings.drain_time_s - time.time())
                self.spawn(self._drain(w, remaining))
                self.spawn(self._heartbeat(w))
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
                ok, message = self.reload_failed(f"upgrade failed (internal error: {e!r})")
        if upgrade["reply"] is not None:
            reply = control.reload_reply(ok, message, self.generation, self.config.digest)
            with socket.socket(fileno=upgrade["reply"]) as client:
                client.setblocking(True)
                client.settimeout(5)
                try:
                    client.sendall(json.dumps(reply).encode() + b"\n")
                except OSError as e:
                    log.warning("could not answer the reload's client: %s", e)
