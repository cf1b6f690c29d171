"""Prometheus metrics for the data plane, served on loopback (python3-prometheus-client).

The hot path only adds to plain ints in dicts (one dict lookup and an add per event, written
out rather than called: no locks, no label parsing); a custom collector turns them into
metric families when Prometheus scrapes, rendered by prometheus_client's text format and
served by our own endpoint on the event loop (``metrics_http.py``: no thread).
:class:`NullMetrics` is the same surface doing nothing, used when metrics are off.
"""

from __future__ import annotations

import bisect
import logging

log = logging.getLogger(__name__)

CONNECT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class NullMetrics:
    """Metrics off: every hook is a no-op."""

    http = None  # the endpoint (metrics_http.MetricsServer), when served
    checks = None  # () -> the health checks' state (a single process's own checker)

    def track_active(self, active: dict[str, int]) -> None: ...
    def track_ejected(self, ejected) -> None: ...
    def configured(self, config) -> None: ...
    def accepted(self, app: str) -> None: ...
    def rejected(self, app: str, reason: str) -> None: ...
    def connected(self, app: str, target, seconds: float, failures) -> None: ...
    def all_down(self, app: str, failures) -> None: ...
    def closed(self, app: str, target, bytes_in: int, bytes_out: int, end: str) -> None: ...
    def reloaded(self, ok: bool, generation: int) -> None: ...
    def track_resolver(self, resolver) -> None: ...
    def dns_lookup(self, result: str) -> None: ...

    def snapshot(self) -> dict | None:
        """The counts for a supervisor (Metrics.snapshot); None: nothing is counted."""
        return None


def _add(d: dict, key, n: int = 1) -> None:
    d[key] = d.get(key, 0) + n


class Metrics(NullMetrics):
    def __init__(self) -> None:
        self.accepted_n: dict[str, int] = {}
        self.active_n: dict[str, int] = {}  # the proxy's own count, read at scrape time
        self.rejected_n: dict[tuple[str, str], int] = {}
        self.closed_n: dict[tuple[str, str], int] = {}
        self.attempts_n: dict[tuple[str, str], int] = {}
        self.failures_n: dict[tuple[str, str, str], int] = {}
        self.retries_n: dict[str, int] = {}
        self.all_down_n: dict[str, int] = {}
        self.bytes_n: dict[tuple[str, str, str], int] = {}
        # (app, target) -> [count per bucket (non-cumulative) ..., +Inf count, sum of seconds]
        self.latency: dict[tuple[str, str], list] = {}
        self.reloads_n: dict[str, int] = {}
        self.generation = 1
        self.dns_lookups_n: dict[str, int] = {}  # result -> lookups (one A + AAAA pair each)
        self.resolver = None  # its names' state is read at scrape time
        self.dns_names: list[dict] = []  # ... or, summed from workers, given here
        self.fds: tuple[int, int] | None = None  # (open, per-process limit): read at scrape
        self._ejected = None  # () -> {(app, target): 0 or 1}: passive health, read at scrape
        self._ejected_sum: dict[tuple[str, str], int] = {}  # ... or, summed from workers
        self.workers: list[tuple[int, int, int]] | None = None  # a supervisor's (index,
        # generation, pid) of each live worker: the process metrics count them too

    # -- hooks, on the event loop's thread --------------------------------------------

    def track_active(self, active: dict[str, int]) -> None:
        """Report the proxy's per-app open-connection count (no second count kept here)."""
        self.active_n = active

    def track_ejected(self, ejected) -> None:
        """``ejected()`` -> {(app, target label): 1 while passive health tries the target
        last (its connect just failed), else 0}: read at scrape time."""
        self._ejected = ejected

    @property
    def ejected_n(self) -> dict[tuple[str, str], int]:
        return self._ejected() if self._ejected is not None else self._ejected_sum

    def configured(self, config) -> None:
        """Every app's and target's series, at zero until something happens to them (so
        a rate or an alert sees them from the start, not from their first connection)."""
        zero_row = [0] * (len(CONNECT_BUCKETS_S) + 1) + [0.0]
        for app in config.apps:
            name = app.name
            for d in (self.accepted_n, self.active_n, self.retries_n, self.all_down_n):
                d.setdefault(name, 0)
            self.closed_n.setdefault((name, "closed"), 0)
            for reason, limit in (("max_connections", app.max_connections),
                                  ("client_connections", app.max_per_client),
                                  ("client_rate", app.rate_per_client), ("rate", app.rate)):
                if limit is not None:
                    self.rejected_n.setdefault((name, reason), 0)
            for target in app.targets:
                t = target.label
                self.attempts_n.setdefault((name, t), 0)
                self.bytes_n.setdefault((name, t, "in"), 0)
                self.bytes_n.setdefault((name, t, "out"), 0)
                self.latency.setdefault((name, t), list(zero_row))

    def accepted(self, app: str) -> None:
        d = self.accepted_n
        d[app] = d.get(app, 0) + 1

    def rejected(self, app: str, reason: str) -> None:
        _add(self.rejected_n, (app, reason))

    def _count_failures(self, app: str, failures) -> None:
        for target, reason in failures:
            t = str(target)
            _add(self.attempts_n, (app, t))
            _add(self.failures_n, (app, t, reason))

    def connected(self, app: str, target, seconds: float, failures) -> None:
        key = (app, target.label)
        d = self.attempts_n
        d[key] = d.get(key, 0) + 1
        hist = self.latency.get(key)
        if hist is None:
            hist = self.latency[key] = [0] * (len(CONNECT_BUCKETS_S) + 1) + [0.0]
        hist[bisect.bisect_left(CONNECT_BUCKETS_S, seconds)] += 1
        hist[-1] += seconds
        if failures:
            self._count_failures(app, failures)
            _add(self.retries_n, app)

    def all_down(self, app: str, failures) -> None:
        self._count_failures(app, failures)
        _add(self.all_down_n, app)

    def closed(self, app: str, target, bytes_in: int, bytes_out: int, end: str) -> None:
        d = self.closed_n
        key = (app, end)
        d[key] = d.get(key, 0) + 1
        if target is not None:
            d, t = self.bytes_n, target.label
            key_in, key_out = (app, t, "in"), (app, t, "out")
            d[key_in] = d.get(key_in, 0) + bytes_in
            d[key_out] = d.get(key_out, 0) + bytes_out

    def reloaded(self, ok: bool, generation: int) -> None:
        _add(self.reloads_n, "ok" if ok else "failed")
        self.generation = generation

    def track_resolver(self, resolver) -> None:
        self.resolver = resolver

    def dns_lookup(self, result: str) -> None:
        _add(self.dns_lookups_n, result)

    def names(self) -> list[dict]:
        return self.resolver.status() if self.resolver is not None else self.dns_names

    # -- more than one worker: a snapshot each, summed by the supervisor -----------------

    # Reloads and the generation are not here: the supervisor counts those itself (one
    # reload is one, however many workers applied it).
    COUNTS = ("accepted_n", "active_n", "rejected_n", "closed_n", "attempts_n", "failures_n",
              "retries_n", "all_down_n", "bytes_n", "latency", "dns_lookups_n", "ejected_n")

    def snapshot(self) -> dict:
        """Every per-connection count as JSON (tuple keys become lists), for the supervisor."""
        snap = {name: [[list(k) if isinstance(k, tuple) else k, v]
                       for k, v in list(getattr(self, name).items())] for name in self.COUNTS}
        snap["dns_names"] = self.names()
        snap["fds"] = list(self.open_fds())
        return snap

    def open_fds(self) -> tuple[int, int]:
        """(fds open, the per-process limit): this process's, or the workers' summed."""
        if self.fds is not None:
            return self.fds
        from .metrics_http import sampled_fds  # (at most a second old: a listing is costly)
        return sampled_fds()

    @classmethod
    def merged(cls, snapshots: list[dict]) -> Metrics:
        """The sum of workers' snapshots (histogram buckets add up too)."""
        total = cls()
        for snap in snapshots:
            for name in cls.COUNTS:
                d = getattr(total, name)
                for k, v in snap.get(name, ()):  # (an older version's snapshot: fewer)
                    key = tuple(k) if isinstance(k, list) else k
                    if isinstance(v, list):  # a histogram row
                        old = d.get(key)
                        d[key] = v if old is None else [a + b for a, b in zip(old, v)]
                    else:
                        d[key] = d.get(key, 0) + v
        total.dns_names = merged_names([snap.get("dns_names", []) for snap in snapshots])
        fds = [snap["fds"] for snap in snapshots if snap.get("fds")]
        total.fds = (sum(f[0] for f in fds), min((f[1] for f in fds), default=0))
        return total

    # -- the scrape, on prometheus_client's thread -------------------------------------

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        from prometheus_client.utils import floatToGoString

        def family(cls, name, doc, labels, data):
            f = cls(name, doc, labels=labels)
            for key, value in list(data.items()):
                f.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return f

        yield family(CounterMetricFamily, "flyproxy_connections_accepted",
                     "Client connections accepted, by app", ["app"], self.accepted_n)
        yield family(GaugeMetricFamily, "flyproxy_connections_active",
                     "Client connections open now, by app", ["app"], self.active_n)
        yield family(CounterMetricFamily, "flyproxy_connections_rejected",
                     "Client connections closed at once (no app on the port, over one of "
                     "the app's limits, no fd or memory left), by app and reason",
                     ["app", "reason"], self.rejected_n)
        yield family(CounterMetricFamily, "flyproxy_connections_closed",
                     "Client connections ended, by app and how (end: closed, idle, reset, "
                     "client-reset, backend-reset, all-targets-down, shutdown ...)",
                     ["app", "end"], self.closed_n)
        yield family(CounterMetricFamily, "flyproxy_connect_attempts",
                     "Connects to a target (each attempt counts), by app and target",
                     ["app", "target"], self.attempts_n)
        yield family(CounterMetricFamily, "flyproxy_connect_failures",
                     "Connects to a target that failed, by app, target and reason",
                     ["app", "target", "reason"], self.failures_n)
        yield family(CounterMetricFamily, "flyproxy_retries",
                     "Connections that needed more than one attempt", ["app"], self.retries_n)
        yield family(CounterMetricFamily, "flyproxy_all_targets_down",
                     "Connections no target accepted", ["app"], self.all_down_n)
        yield family(CounterMetricFamily, "flyproxy_bytes",
                     "Bytes relayed (in: from clients, out: to clients)",
                     ["app", "target", "direction"], self.bytes_n)
        hist = HistogramMetricFamily("flyproxy_connect_seconds",
                                     "Time to connect to the chosen target", labels=["app", "target"])
        for key, counts in list(self.latency.items()):
            counts = list(counts)
            cumulative, buckets = 0, []
            for bound, n in zip((*map(floatToGoString, CONNECT_BUCKETS_S), "+Inf"), counts[:-1]):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric(list(key), buckets, counts[-1])
        yield hist
        yield family(GaugeMetricFamily, "flyproxy_target_ejected",
                     "1 while passive health tries the target last, its connect having just "
                     "failed (--eject); with workers, how many of them do",
                     ["app", "target"], self.ejected_n)
        yield family(CounterMetricFamily, "flyproxy_reloads",
                     "Config reloads, by result (ok, failed)", ["result"], self.reloads_n)
        gen = GaugeMetricFamily("flyproxy_config_generation", "Config generation in force (1 at start, "
                                "one more at each reload applied)")
        gen.add_metric([], self.generation)
        yield gen
        yield family(CounterMetricFamily, "flyproxy_dns_lookups",
                     "Host-name lookups (A and AAAA of one name), by result", ["result"],
                     self.dns_lookups_n)
        names = self.names()
        state = GaugeMetricFamily("flyproxy_dns_state", "1 for the state a host-name target "
                                  "is in now: pending (never answered), fresh, refreshing "
                                  "(past its TTL, asked again), stale (the resolver fails: "
                                  "last addresses kept), down (no address)",
                                  labels=["name", "state"])
        count = GaugeMetricFamily("flyproxy_dns_addresses", "Addresses a host name has now",
                                  labels=["name"])
        age = GaugeMetricFamily("flyproxy_dns_answer_age_seconds",
                                "Seconds since a host name was last answered", labels=["name"])
        for row in names:
            state.add_metric([row["name"], row["state"]], 1)
            count.add_metric([row["name"]], len(row["addresses"]))
            if row["age_s"] is not None:
                age.add_metric([row["name"]], row["age_s"])
        yield state
        yield count
        yield age
        if self.checks is not None:
            yield from check_families(self.checks())
        used, limit = self.open_fds()
        open_fds = GaugeMetricFamily("flyproxy_open_fds", "File descriptors open (summed over "
                                     "the workers)")
        open_fds.add_metric([], used)
        yield open_fds
        max_fds = GaugeMetricFamily("flyproxy_max_fds", "File descriptors one process may "
                                    "open (LimitNOFILE)")
        max_fds.add_metric([], limit)
        yield max_fds
        from .process_metrics import families
        if self.workers is not None:  # a supervisor: its own fds too
            from .metrics_http import sampled_fds
            used += sampled_fds()[0]
        yield from families((used, limit), self.workers)



def merged_names(per_worker: list[list[dict]]) -> list[dict]:
    """Each name's freshest row over the workers (each resolves on its own)."""
    best: dict[str, dict] = {}
    for rows in per_worker:
        for row in rows:
            old = best.get(row["name"])
            age = row["age_s"] if row["age_s"] is not None else float("inf")
            if old is None or age < (old["age_s"] if old["age_s"] is not None else float("inf")):
                best[row["name"]] = row
    return [best[name] for name in sorted(best)]


def check_families(rows: list[dict]):
    """Prometheus families for the active health checks' state (``checks.Checker.state``)."""
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily("flyproxy_target_up", "Active health check: 1 if the target is up",
                           labels=["app", "target"])
    since = GaugeMetricFamily("flyproxy_target_state_since_timestamp_seconds",
                              "Unix time of the target's last up/down transition (or the "
                              "check's start)", labels=["app", "target"])
    for row in rows:
        up.add_metric([row["app"], row["target"]], 1 if row["state"] == "up" else 0)
        since.add_metric([row["app"], row["target"]], row["since"])
    yield up
    yield since


def exposition(collector) -> bytes:
    """``collector``'s families in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def endpoint(address: str, render):
    """The /metrics endpoint for ``address`` (HOST:PORT), bound now; started by the server."""
    from .metrics_http import MetricsServer, bind
    from .settings import parse_hostport

    host, port = parse_hostport(address)
    return MetricsServer(bind(host or "127.0.0.1", port), render)


def create(address: str | None) -> NullMetrics:
    """Metrics served at ``address`` (HOST:PORT), or NullMetrics when it is None."""
    if not address:
        return NullMetrics()
    metrics = Metrics()

    async def render() -> bytes:
        return exposition(metrics)

    metrics.http = endpoint(address, render)
    return metrics
