"""Random-then-retry target selection.

Pick a target at random; if the connect fails (refused, unreachable, timed out,
name does not resolve) try the remaining targets in random order, each at most
once, every attempt bounded by its own timeout (the attempts themselves are made
by :class:`appliance.dataplane.tunnel.Tunnel`). The client never sees a failure while any
target works.
"""

from __future__ import annotations

import random
import time
from typing import Sequence

from ..config import Target


def describe(failures: list[tuple[Target, str]]) -> str:
    """``[(target, reason), ...]`` -> ``"10.0.0.1:80: refused, db:5432: dns"``."""
    return ", ".join(f"{target}: {reason}" for target, reason in failures)


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
        if len(targets) == 1:  # that is the order, healthy or not
            return targets
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
