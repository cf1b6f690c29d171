"""Prometheus metrics for the data plane (python3-prometheus-client), served on loopback.

Label children are looked up once per (app, target) and cached: the per-connection cost
is a few counter increments, no label parsing. :class:`NullMetrics` is the same surface
doing nothing, used when metrics are off.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

CONNECT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class NullMetrics:
    """Metrics off: every hook is a no-op."""

    def accepted(self, app: str) -> None: ...
    def rejected(self, app: str, reason: str) -> None: ...
    def connected(self, app: str, target, seconds: float, failures) -> None: ...
    def all_down(self, app: str, failures) -> None: ...
    def closed(self, app: str, target, bytes_in: int, bytes_out: int, end: str) -> None: ...
    def reloaded(self, ok: bool, generation: int) -> None: ...


class Metrics(NullMetrics):
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self._accepted = Counter("flyproxy_connections_accepted", "Connections accepted", ["app"], registry=r)
        self._active = Gauge("flyproxy_connections_active", "Connections open now", ["app"], registry=r)
        self._rejected = Counter("flyproxy_connections_rejected", "Connections closed at once",
                                 ["app", "reason"], registry=r)
        self._closed = Counter("flyproxy_connections_closed", "Connections ended, by how",
                               ["app", "end"], registry=r)
        self._attempts = Counter("flyproxy_connect_attempts", "Backend connect attempts",
                                 ["app", "target"], registry=r)
        self._failures = Counter("flyproxy_connect_failures", "Backend connect failures",
                                 ["app", "target", "reason"], registry=r)
        self._retries = Counter("flyproxy_retries", "Connections that needed more than one attempt",
                                ["app"], registry=r)
        self._all_down = Counter("flyproxy_all_targets_down", "Connections no target accepted",
                                 ["app"], registry=r)
        self._latency = Histogram("flyproxy_connect_seconds", "Time to connect to the chosen target",
                                  ["app", "target"], buckets=CONNECT_BUCKETS_S, registry=r)
        self._bytes = Counter("flyproxy_bytes", "Bytes relayed (in: from clients, out: to clients)",
                              ["app", "target", "direction"], registry=r)
        self._reloads = Counter("flyproxy_reloads", "Config reloads", ["result"], registry=r)
        self._generation = Gauge("flyproxy_config_generation", "Config generation in force", registry=r)
        self._generation.set(1)
        self._cache: dict[tuple, object] = {}

    def _child(self, metric, *labels):
        key = (id(metric), labels)
        child = self._cache.get(key)
        if child is None:
            child = self._cache[key] = metric.labels(*labels)
        return child

    def accepted(self, app: str) -> None:
        self._child(self._accepted, app).inc()
        self._child(self._active, app).inc()

    def rejected(self, app: str, reason: str) -> None:
        self._child(self._rejected, app, reason).inc()

    def _count_failures(self, app: str, failures) -> None:
        for target, reason in failures:
            t = str(target)
            self._child(self._attempts, app, t).inc()
            self._child(self._failures, app, t, reason).inc()

    def connected(self, app: str, target, seconds: float, failures) -> None:
        t = str(target)
        self._child(self._attempts, app, t).inc()
        self._child(self._latency, app, t).observe(seconds)
        if failures:
            self._count_failures(app, failures)
            self._child(self._retries, app).inc()

    def all_down(self, app: str, failures) -> None:
        self._count_failures(app, failures)
        self._child(self._all_down, app).inc()

    def closed(self, app: str, target, bytes_in: int, bytes_out: int, end: str) -> None:
        self._child(self._active, app).dec()
        self._child(self._closed, app, end).inc()
        if target is not None:
            t = str(target)
            self._child(self._bytes, app, t, "in").inc(bytes_in)
            self._child(self._bytes, app, t, "out").inc(bytes_out)

    def reloaded(self, ok: bool, generation: int) -> None:
        self._child(self._reloads, "ok" if ok else "failed").inc()
        self._generation.set(generation)

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics over HTTP from a daemon thread."""
        from prometheus_client import start_http_server

        start_http_server(port, host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


def create(address: str | None) -> NullMetrics:
    """Metrics served at ``address`` (HOST:PORT), or NullMetrics when it is None."""
    if not address:
        return NullMetrics()
    from .listeners import parse_hostport

    host, port = parse_hostport(address)
    metrics = Metrics()
    metrics.serve(host or "127.0.0.1", port)
    return metrics
