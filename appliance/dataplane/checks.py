"""Active health checks: a TCP connect to every target of each app with a "HealthCheck".

One :class:`Checker` per host, in the process that owns the config: the single process, or
the supervisor, which hands the result (:meth:`Checker.state`) to every worker on each
change and to each worker it starts. A target starts up; ``Fall`` failed checks in a row
take it down, ``Rise`` good ones bring it back; each change is logged once. A check is a
connect to the target's address (a host name's first address that answers, from the
resolver; none: the check fails with "dns"), bounded by ``Timeout``, every ``Interval``.

What the balancer does with it (``balancer.Health.order``): a target that is down is tried
after every target that is up, and when all are down all are still tried (availability
before opinion). Passive failures still count on their own: a target whose connect just
failed goes after the healthy ones in that worker, whatever its checks say.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from typing import Callable

from ..config import Config, HealthCheck, Target
from . import proxy_protocol as pp
from .tunnel import failure_reason

log = logging.getLogger(__name__)


class TargetCheck:
    __slots__ = ("app", "target", "params", "up", "since", "oks", "fails", "error", "checks")

    def __init__(self, app: str, target: Target, params: HealthCheck) -> None:
        self.app, self.target, self.params = app, target, params
        self.up = True
        self.since = time.time()  # the last transition (or the start)
        self.oks = self.fails = 0  # consecutive results
        self.error = ""  # why the last failed check failed
        self.checks = 0

    def row(self) -> dict:
        return {"app": self.app, "target": str(self.target), "state": "up" if self.up else "down",
                "since": round(self.since, 3), "error": self.error, "checks": self.checks}


class Checker:
    """Checks for every (app, target) of the apps with a HealthCheck; ``on_change()`` runs
    after each state change (and after a config is applied)."""

    def __init__(self, addresses: Callable[[Target], list], on_change: Callable[[], None]) -> None:
        self.addresses = addresses  # target -> [(family, sockaddr), ...]
        self.on_change = on_change
        self.checks: dict[tuple[str, Target], TargetCheck] = {}
        self.tasks: dict[tuple[str, Target], asyncio.Task] = {}
        self.headers: dict[str, bytes] = {}  # app -> what its checks send (ProxyProtocol)

    def __repr__(self) -> str:
        down = sum(not c.up for c in self.checks.values())
        return f"<Checker {len(self.checks)} targets, {down} down>"

    def apply(self, config: Config) -> None:
        """Check what ``config`` asks for: start new checks, stop removed ones, and restart
        the ones whose parameters changed (keeping their state)."""
        wanted: dict[tuple[str, Target], HealthCheck] = {
            (app.name, t): app.health_check for app in config.apps if app.health_check
            for t in app.targets}
        self.headers = {app.name: pp.local(app.proxy_protocol) for app in config.apps
                        if app.proxy_protocol}
        for key in list(self.checks):
            if wanted.get(key) != self.checks[key].params:
                self.tasks.pop(key).cancel()
                old = self.checks.pop(key)
                if key in wanted:
                    new = self.checks[key] = TargetCheck(*key, wanted[key])
                    new.up, new.since, new.error = old.up, old.since, old.error
                    self.tasks[key] = asyncio.ensure_future(self._run(new))
        for key, params in wanted.items():
            if key not in self.checks:
                check = self.checks[key] = TargetCheck(*key, params)
                self.tasks[key] = asyncio.ensure_future(self._run(check))
        self.on_change()

    def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()

    # -- what the balancer, status and metrics read --------------------------------------

    def down(self) -> dict[str, frozenset]:
        """App -> the targets its checks hold down (apps with none left out)."""
        down: dict[str, set] = {}
        for (app, target), check in self.checks.items():
            if not check.up:
                down.setdefault(app, set()).add(target)
        return {app: frozenset(targets) for app, targets in down.items()}

    def state(self) -> list[dict]:
        return [c.row() for c in self.checks.values()]

    # -- checking ----------------------------------------------------------------------------

    async def _run(self, check: TargetCheck) -> None:
        params = check.params
        # spread the first checks over an interval (at most a second): not all at once
        await asyncio.sleep(random.uniform(0, min(params.interval_s, 1.0)))
        while True:
            ok, why = await self.probe(check.target, params.timeout_s,
                                       self.headers.get(check.app, b""))
            self.record(check, ok, why)
            await asyncio.sleep(params.interval_s)  # the check's period (a timer, not a wait)

    async def probe(self, target: Target, timeout_s: float,
                    header: bytes = b"") -> tuple[bool, str]:
        """(connected?, why not) for one check of ``target``: its addresses in turn, all
        within ``timeout_s``. ``header`` (a PROXY protocol LOCAL/UNKNOWN header, for a
        target that expects one) is sent before the close; the check is still the connect."""
        addrs = target.addrs if target.addrs is not None else self.addresses(target)
        if not addrs:
            return False, "dns"
        loop = asyncio.get_running_loop()
        why = "no address"
        try:
            async with asyncio.timeout(timeout_s):
                for family, sockaddr in addrs:
                    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                         | socket.SOCK_CLOEXEC)
                    try:
                        await loop.sock_connect(sock, sockaddr)
                        if header:
                            with contextlib.suppress(OSError):
                                await loop.sock_sendall(sock, header)
                        return True, ""
                    except OSError as e:
                        why = failure_reason(e)
                    finally:
                        sock.close()
        except TimeoutError:
            return False, "timeout"
        return False, why

    def record(self, check: TargetCheck, ok: bool, why: str) -> None:
        check.checks += 1
        params = check.params
        if ok:
            check.oks, check.fails = check.oks + 1, 0
            if not check.up and check.oks >= params.rise:
                self._transition(check, True)
            return
        check.fails, check.oks, check.error = check.fails + 1, 0, why
        if check.up and check.fails >= params.fall:
            self._transition(check, False)

    def _transition(self, check: TargetCheck, up: bool) -> None:
        check.up, check.since = up, time.time()
        if up:
            log.info("app %s target %s is up: %d checks passed in a row", check.app,
                     check.target, check.oks)
        else:
            log.warning("app %s target %s is down: %d checks failed in a row (%s); tried only "
                        "when no other target is up", check.app, check.target, check.fails,
                        check.error)
        self.on_change()


def check_families(rows: list[dict]):
    """Prometheus families for the checks' state."""
    from prometheus_client.core import GaugeMetricFamily

    up = GaugeMetricFamily("flyproxy_target_up", "Active health check: 1 if the target is up",
                           labels=["app", "target"])
    since = GaugeMetricFamily("flyproxy_target_state_since_seconds",
                              "Unix time of the target's last up/down transition (or the "
                              "check's start)", labels=["app", "target"])
    for row in rows:
        up.add_metric([row["app"], row["target"]], 1 if row["state"] == "up" else 0)
        since.add_metric([row["app"], row["target"]], row["since"])
    yield up
    yield since
