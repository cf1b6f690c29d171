"""Target selection: the order a connection tries an app's targets in.

"random" (the default): pick a target at random; if the connect fails (refused,
unreachable, timed out, name does not resolve) try the remaining targets in random order,
each at most once, every attempt bounded by its own timeout (the attempts themselves are
made by :class:`appliance.dataplane.tunnel.Tunnel`). The client never sees a failure
while any target works.

"least-connections": the first pick is the less busy of two targets drawn at random
(power of two choices, by this worker's open connections to each), then the same retry
order over the rest.

Health orders the candidates first: targets an active check holds down go last, and so do
targets whose connect just failed (passive); neither is ever skipped.
"""

from __future__ import annotations

import random
import time
from typing import AbstractSet as Set, Callable, Sequence

from ..config import Target


def describe(failures: list[tuple[Target, str]]) -> str:
    """``[(target, reason), ...]`` -> ``"10.0.0.1:80: refused, db:5432: dns"``."""
    return ", ".join(f"{target}: {reason}" for target, reason in failures)


def attempt_order(targets: Sequence[Target]) -> Sequence[Target]:
    """All targets, each once, in random order (the first one is the random pick)."""
    return targets if len(targets) == 1 else random.sample(targets, len(targets))


def least_loaded_order(targets: Sequence[Target], load: Callable[[Target], int]
                       ) -> Sequence[Target]:
    """All targets, each once: first the less loaded of two random ones (a tie: either),
    then the rest in random order."""
    if len(targets) < 2:
        return targets
    order = random.sample(targets, len(targets))
    if load(order[1]) < load(order[0]):
        order[0], order[1] = order[1], order[0]
    return order


class Health:
    """Passive health: a target whose connect just failed is tried last for ``eject_s``.

    It is never skipped: when every target has failed recently they are all still tried,
    healthy ones first, so an ejection can only cost order, never availability.
    """

    def __init__(self, eject_s: float = 10.0) -> None:
        self.eject_s = eject_s
        self.failed: dict[Target, tuple[float, str]] = {}  # target -> (when, reason)
        self.seen: set[Target] = set()  # targets a connect reached, ever

    def __repr__(self) -> str:
        return f"<Health eject_s={self.eject_s} failed={len(self.failed)}>"

    def order(self, targets: Sequence[Target], down: Set[Target] | None = None,
              load: Callable[[Target], int] | None = None) -> Sequence[Target]:
        """``targets`` in the order to try them: the ones up first (picked by ``load``'s
        least-connections when given, else at random), then those that failed a connect
        recently, then those an active check holds ``down``."""
        if len(targets) == 1:  # that is the order, healthy or not
            return targets
        checked_down: list[Target] = []
        if down:
            up = [t for t in targets if t not in down]
            if up and len(up) < len(targets):  # all down: all tried, as if none were
                checked_down = [t for t in targets if t in down]
                targets = up
        if self.failed:
            cutoff = time.monotonic() - self.eject_s
            healthy, ejected = [], []
            for t in targets:
                failure = self.failed.get(t)
                (ejected if failure and failure[0] > cutoff else healthy).append(t)
        else:
            healthy, ejected = targets, []
        first = least_loaded_order(healthy, load) if load is not None else attempt_order(healthy)
        if not ejected and not checked_down:
            return first
        return [*first, *attempt_order(ejected), *attempt_order(checked_down)]

    def failure(self, target: Target, reason: str) -> None:
        self.failed[target] = (time.monotonic(), reason)

    def success(self, target: Target) -> None:
        if self.failed:
            self.failed.pop(target, None)

    def ejected(self, target: Target) -> bool:
        """Is ``target`` tried last now, its connect having failed within ``eject_s``?"""
        failure = self.failed.get(target)
        return failure is not None and time.monotonic() - failure[0] < self.eject_s

    def describe(self, target: Target) -> str:
        failure = self.failed.get(target)
        if failure is None:
            return "ok"
        ago = time.monotonic() - failure[0]
        state = "ejected" if ago < self.eject_s else "failed"
        return f"{state}: {failure[1]} {ago:.0f}s ago"
