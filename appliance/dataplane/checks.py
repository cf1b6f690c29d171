"""Active health checks: a TCP connect to every target of each app with a "HealthCheck".

One :class:`Checker` per host, in the process that owns the config: the single process, or
the supervisor, which sends every worker the *changes* (``on_change``: a batch of
(app, target, up)), coalesced while a worker is still applying the previous batch, and the
whole down-set once to each worker it starts. Applying a batch costs its own size, never
the total target count (:func:`apply_changes`), so 2,000 targets going down together is
one message of 2,000 entries per worker, not 2,000 messages of up to 2,000 each.

A target starts up; ``Fall`` failed checks in a row take it down, ``Rise`` good ones bring
it back. Each change is logged, at most ``LOG_BURST`` a second one by one and the rest
summed up in one line a second, so a mass failure is a few lines, not thousands. A check is
a connect to the target's address (a host name's first address that answers, from the
resolver; none: the check fails with "dns"), bounded by ``Timeout``, every ``Interval``.

The host's checks are on a budget: at most ``MAX_CHECKS_PER_S`` a second in all, and no
target more often than every ``MIN_INTERVAL_S``; an app whose Interval would go past that
is checked less often (logged once per apply), so 1,000 targets at 0.01 s cannot eat the
CPU the data plane needs.

What the balancer does with it (``balancer.Health.order``): a target that is down is tried
after every target that is up, and when all are down all are still tried (availability
before opinion). Passive failures still count on their own: a target whose connect just
failed goes after the healthy ones in that worker, whatever its checks say.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import time
from typing import Callable, Iterable

from ..config import Config, HealthCheck, Target
from . import proxy_protocol as pp
from .tunnel import failure_reason

log = logging.getLogger(__name__)

MAX_CHECKS_PER_S = 500  # the host's check budget (each a connect: ~50-100 us of CPU)
MIN_INTERVAL_S = 0.1  # no target is checked more often than this
LOG_BURST = 10  # state changes logged one by one each second; the rest summed in one line

Change = tuple[str, Target, bool]  # (app, target, up): one state change


def apply_changes(down: dict[str, set], changes: Iterable[Change]) -> None:
    """Apply state changes to ``down`` (app -> the targets held down), in place: the cost
    is the number of changes, whatever the number of targets."""
    for app, target, up in changes:
        if up:
            held = down.get(app)
            if held is not None:
                held.discard(target)
                if not held:
                    del down[app]
        else:
            down.setdefault(app, set()).add(target)


def encode_changes(changes: Iterable[Change], reset: bool = False) -> str:
    """The ``health`` command a supervisor sends a worker: the changes (``reset``: the
    whole down-set, replacing what the worker held)."""
    doc: dict = {"reset": reset, "down": [], "up": []}
    for app, target, up in changes:
        doc["up" if up else "down"].append([app, str(target)])
    return "health " + json.dumps(doc, separators=(",", ":"))


def decode_changes(command: str) -> tuple[bool, list[Change]]:
    """(reset, changes) from a ``health`` command (see :func:`encode_changes`)."""
    doc = json.loads(command[len("health "):])
    changes = [(app, Target.parse(t), False) for app, t in doc["down"]]
    changes += [(app, Target.parse(t), True) for app, t in doc["up"]]
    return bool(doc["reset"]), changes


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
    """Checks for every (app, target) of the apps with a HealthCheck; ``on_change(changes)``
    runs with each state change, and with the targets a config apply stops holding down."""

    def __init__(self, addresses: Callable[[Target], list],
                 on_change: Callable[[list[Change]], None]) -> None:
        self.addresses = addresses  # target -> [(family, sockaddr), ...]
        self.on_change = on_change
        self.checks: dict[tuple[str, Target], TargetCheck] = {}
        self.tasks: dict[tuple[str, Target], asyncio.Task] = {}
        self.intervals: dict[str, float] = {}  # app -> the interval it is checked at
        self._unlogged = {True: 0, False: 0}  # changes past LOG_BURST this second
        self._logged = 0
        self._log_timer: asyncio.TimerHandle | None = None
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
        self.intervals = self._budget(config, len(wanted))
        released: list[Change] = []  # held down, and no longer checked
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
                elif not old.up:
                    released.append((*key, True))
        for key, params in wanted.items():
            if key not in self.checks:
                check = self.checks[key] = TargetCheck(*key, params)
                self.tasks[key] = asyncio.ensure_future(self._run(check))
        if released:
            self.on_change(released)

    def _budget(self, config: Config, total: int) -> dict[str, float]:
        """App -> its check interval: its Interval, raised to MIN_INTERVAL_S and so that all
        the host's checks together stay within MAX_CHECKS_PER_S (each app's share of the
        budget is its share of the targets)."""
        floor = total / MAX_CHECKS_PER_S
        intervals = {}
        for app in config.apps:
            if not app.health_check:
                continue
            asked = app.health_check.interval_s
            intervals[app.name] = max(asked, MIN_INTERVAL_S, floor)
            if intervals[app.name] > asked:
                log.warning("app %s: HealthCheck Interval %gs raised to %gs (the host checks "
                            "at most %d targets a second, none more often than every %gs; "
                            "%d targets are checked)", app.name, asked, intervals[app.name],
                            MAX_CHECKS_PER_S, MIN_INTERVAL_S, total)
        return intervals

    def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        if self._log_timer is not None:
            self._log_timer.cancel()

    # -- what the balancer, status and metrics read --------------------------------------

    def down(self) -> dict[str, set]:
        """App -> the targets its checks hold down (apps with none left out)."""
        down: dict[str, set] = {}
        for (app, target), check in self.checks.items():
            if not check.up:
                down.setdefault(app, set()).add(target)
        return down

    def down_changes(self) -> list[Change]:
        """The whole down-set as changes (what a worker starting now is told)."""
        return [(app, target, False) for (app, target), check in self.checks.items()
                if not check.up]

    def state(self) -> list[dict]:
        return [c.row() for c in self.checks.values()]

    # -- checking ----------------------------------------------------------------------------

    async def _run(self, check: TargetCheck) -> None:
        params = check.params
        # spread the first checks over an interval: not all at once
        await asyncio.sleep(random.uniform(0, self.interval(check)))
        while True:
            ok, why = await self.probe(check.target, params.timeout_s,
                                       self.headers.get(check.app, b""))
            self.record(check, ok, why)
            await asyncio.sleep(self.interval(check))  # the period (a timer, not a wait)

    def interval(self, check: TargetCheck) -> float:
        return self.intervals.get(check.app, check.params.interval_s)

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
        self._log_transition(check, up)
        self.on_change([(check.app, check.target, up)])

    def _log_transition(self, check: TargetCheck, up: bool) -> None:
        if self._log_timer is None:
            self._log_timer = asyncio.get_running_loop().call_later(1.0, self._log_summary)
        if self._logged >= LOG_BURST:
            self._unlogged[up] += 1
            return
        self._logged += 1
        if up:
            log.info("app %s target %s is up: %d checks passed in a row", check.app,
                     check.target, check.oks)
        else:
            log.warning("app %s target %s is down: %d checks failed in a row (%s); tried only "
                        "when no other target is up", check.app, check.target, check.fails,
                        check.error)

    def _log_summary(self) -> None:
        """Once a second while targets change: what was not logged one by one."""
        self._log_timer = None
        self._logged = 0
        ups, downs = self._unlogged[True], self._unlogged[False]
        self._unlogged = {True: 0, False: 0}
        if ups or downs:
            held = sum(not c.up for c in self.checks.values())
            log.warning("health checks: %d more targets went down and %d came up in the last "
                        "second (not logged one by one); %d of %d targets are down now",
                        downs, ups, held, len(self.checks))
