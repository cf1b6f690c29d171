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


def attempt_order(targets: Sequence[Target]) -> list[Target]:
    """All targets, each once, in random order (the first one is the random pick)."""
    return random.sample(targets, len(targets))


async def connect(
    targets: Sequence[Target],
    protocol_factory: Callable[[], asyncio.Protocol],
    connect_timeout_s: float,
) -> tuple[asyncio.Transport, asyncio.Protocol, Target, list[tuple[Target, str]]]:
    """Connect to one of ``targets``; return (transport, protocol, target, failures).

    ``failures`` lists the targets tried before the one that answered, and why each failed.

    Names are resolved by the event loop (getaddrinfo in its executor), so the loop
    never blocks. Raises AllTargetsFailed when no target accepts.
    """
    loop = asyncio.get_running_loop()
    failures: list[tuple[Target, str]] = []
    for target in attempt_order(targets):
        try:
            async with asyncio.timeout(connect_timeout_s):
                transport, protocol = await loop.create_connection(
                    protocol_factory, target.host, target.port)
        except (OSError, TimeoutError) as exc:
            failures.append((target, failure_reason(exc)))
            continue
        return transport, protocol, target, failures
    raise AllTargetsFailed(failures)
