"""Logging helpers: errors that repeat are logged once per interval, never as a flood."""

from __future__ import annotations

import logging
import time


def count(n: int, noun: str) -> str:
    """``1 app``, ``2 apps``: a number and its noun (plural with an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class RateLimited:
    """Log a message for ``key`` at most once per ``interval_s``; say how many were held back.

    >>> limited = RateLimited(log, 10.0)
    >>> limited.warning("app-x-down", "app %s: all targets failed", "x")
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last logged, suppressed since)

    def log(self, level: int, key: str, msg: str, *args, **kw) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        last, suppressed = self._last.get(key, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._last[key] = (last, suppressed + 1)
            return
        if suppressed:
            msg += f" (and {suppressed} more like it in the last {now - last:.0f}s)"
        self._last[key] = (now, 0)
        if len(self._last) > 10_000:  # keys come from apps and ports: bounded, but be safe
            self._last.clear()
        self.logger.log(level, msg, *args, **kw)

    def warning(self, key: str, msg: str, *args, **kw) -> None:
        self.log(logging.WARNING, key, msg, *args, **kw)

    def error(self, key: str, msg: str, *args, **kw) -> None:
        self.log(logging.ERROR, key, msg, *args, **kw)
