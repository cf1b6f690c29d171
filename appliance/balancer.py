"""Random-then-retry target selection.

Pick a target at random; if the connect fails (refused, unreachable, timed out,
name does not resolve) try the remaining targets in random order, each at most
once, every attempt bounded by its own timeout. The client never sees a failure
while any target works.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Callable, Sequence

from .config import Target


class AllTargetsFailed(Exception):
    """Every target was tried once and none accepted; ``failures`` says why, per target."""

    def __init__(self, failures: list[tuple[Target, str]]):
        self.failures = failures
        super().__init__(describe(failures) or "no targets")


def describe(failures: list[tuple[Target, str]]) -> str:
    """``[(target, reason), ...]`` -> ``"10.0.0.1:80: refused, db:5432: dns"``."""
    return ", ".join(f"{target}: {reason}" for target, reason in failures)


def failure_reason(exc: BaseException) -> str:
    """A short, stable label for why a connect failed (used in logs and metrics)."""
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return type(exc).__name__


def attempt_order(targets: Sequence[Target]) -> Sequence[Target]:
    """All targets, each once, in random order (the first one is the random pick)."""
    return targets if len(targets) == 1 else random.sample(targets, len(targets))


class Health:
    """Passive health: a target whose connect just failed is tried last for ``eject_s``.

    It is never skipped: when every target has failed recently they are all still tried,
    healthy ones first, so an ejection can only cost order, never availability.
    """

    def __init__(self, eject_s: float = 10.0) -> None:
        self.eject_s = eject_s
        self.failed: dict[Target, tuple[float, str]] = {}  # target -> (when, reason)

    def __repr__(self) -> str:
        return f"<Health eject_s={self.eject_s} failed={len(self.failed)}>"

    def order(self, targets: Sequence[Target]) -> Sequence[Target]:
        if not self.failed:
            return attempt_order(targets)
        cutoff = time.monotonic() - self.eject_s
        healthy, ejected = [], []
        for t in targets:
            failure = self.failed.get(t)
            (ejected if failure and failure[0] > cutoff else healthy).append(t)
        return [*attempt_order(healthy), *attempt_order(ejected)]

    def failure(self, target: Target, reason: str) -> None:
        self.failed[target] = (time.monotonic(), reason)

    def success(self, target: Target) -> None:
        if self.failed:
            self.failed.pop(target, None)

    def describe(self, target: Target) -> str:
        failure = self.failed.get(target)
        if failure is None:
            return "ok"
        ago = time.monotonic() - failure[0]
        state = "ejected" if ago < self.eject_s else "failed"
        return f"{state}: {failure[1]} {ago:.0f}s ago"


async def connect(
    targets: Sequence[Target],
    protocol_factory: Callable[[], asyncio.Protocol],
    connect_timeout_s: float,
    health: Health,
) -> tuple[asyncio.Transport, asyncio.Protocol, Target, list[tuple[Target, str]], float]:
    """Connect to one of ``targets``; return (transport, protocol, target, failures, seconds).

    ``failures`` lists the targets tried before the one that answered and why each failed;
    ``seconds`` is how long the successful attempt took. Names are resolved by the event
    loop (getaddrinfo in its executor), so the loop never blocks. Raises AllTargetsFailed
    when no target accepts.
    """
    loop = asyncio.get_running_loop()
    failures: list[tuple[Target, str]] = []
    for target in health.order(targets):
        started = loop.time()
        try:
            async with asyncio.timeout(connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    protocol_factory, target.host, target.port)
        except (OSError, TimeoutError) as exc:
            reason = failure_reason(exc)
            failures.append((target, reason))
            health.failure(target, reason)
            continue
        health.success(target)
        return transport, protocol, target, failures, loop.time() - started
    raise AllTargetsFailed(failures)
