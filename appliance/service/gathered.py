"""What a supervisor shows: every worker's status and counts, gathered over their
channels when asked and summed (a mixin of the Supervisor)."""

from __future__ import annotations

import time

from ..dataplane import listeners
from . import target_state

from .workers import MAX_BACKOFF_S, METRICS_TIMEOUT_S, RESTART_WINDOW_S, RESTARTS

class Gathered:
    """Status and metrics over the workers (a mixin of the Supervisor)."""

    async def status(self) -> dict:
        """Every worker's status, summed: connection counts add up; a target's health is
        shown per worker where the workers (which eject targets on their own) disagree."""
        # the checks' state as it is before the workers are asked: a change told to them
        # already went down their channels ahead of this request, so a target shown down
        # here is one every ready worker already treats as down
        checks = {(r["app"], r["target"]): r for r in self.checks.state()}
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
                  "group": ("[%s]:%d" % self.lanes[0][0].getsockname()[:2]) if self.lanes
                  else None,
                  "lanes": len(self.lanes),
                  "listeners": listeners.described(self.sockets),
                  "version": self.code["version"], "code": self.code["digest"],
                  "generations": self._generations(everyone),
                  "last_reload": self.last_reload}
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
                rows = {t["target"]: t for t in a["targets"]}
                for t in merged["targets"]:
                    row = rows.get(t["target"])
                    if row is not None:
                        t["health"][w.index] = row["health"]
                        t.setdefault("states", {})[w.index] = row
        for a in apps.values():
            for t in a["targets"]:
                seen = set(t["health"].values())
                t["health"] = (seen.pop() if len(seen) == 1 else
                               "; ".join(f"worker {i}: {h}" for i, h in sorted(t["health"].items())))
                check = checks.get((a["name"], t["target"]))
                if check is not None:
                    t["check"] = check
                one = target_state.merged({i: {k: r[k] for k in ("state", "reason", "since",
                                                                   "text")}
                                           for i, r in t.pop("states", {}).items()})
                if check is not None and check["state"] == "down":  # the host's checks say
                    one = target_state.state(check=check, held_down=True, name=None,
                                             failure=None, eject_s=0, seen=True)
                t.update(one)
        status["apps"] = list(apps.values())
        from ..metrics import merged_names
        status["names"] = merged_names([r.get("names", []) for _, r in replies])
        return status

    def serve_metrics(self) -> None:
        """Bind the metrics endpoint (before :meth:`serve`, so a bad address fails early)."""
        from .. import metrics as metricsmod

        if self.settings.metrics:
            self.metrics_http = metricsmod.endpoint(self.settings.metrics, self.render_metrics)

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
        total.workers = [(w.index, w.generation, w.proc.pid) for w in self.all_workers()
                         if w.proc is not None and w.proc.returncode is None]
        return total


class _GatheredMetrics:
    """A prometheus_client collector: the workers' summed counts, and the supervisor's own."""

    def __init__(self, supervisor, total) -> None:
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
        from ..metrics import check_families
        yield from check_families(sup.checks.state())
