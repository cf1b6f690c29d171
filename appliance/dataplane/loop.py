"""Everything the data plane needs from asyncio's internals, in one module.

The engine's epoll set is also the event loop's wait (one ``epoll_wait`` per wakeup, see
engine.py): :class:`EngineSelector` replaces the loop's selector, and its ``select()``
returns to the loop only when the loop has work. For that it reads four attributes of
asyncio's ``BaseEventLoop`` / ``BaseSelectorEventLoop``: ``_selector`` (where a loop keeps
its selector), ``_ready`` (callbacks made ready), ``_scheduled`` (timers) and
``_stopping``. They are stable across Python 3.11 (the version we ship on) and later;
:func:`check` says loudly if an upgrade changes them (a test runs it).

:func:`new_event_loop` is the loop factory the proxy runs on: asyncio's own with this
selector (``auto``, ``asyncio``), or uvloop, whose loop the engine only watches through
one more fd (``adopt`` returns None there).
"""

from __future__ import annotations

import asyncio
import collections
import math
import select
import selectors
from time import monotonic as _monotonic
from typing import TYPE_CHECKING

from .epoll import MAX_EVENTS

if TYPE_CHECKING:
    from .engine import Engine

INTERNALS = {"_selector": selectors.BaseSelector, "_ready": collections.deque,
             "_scheduled": list, "_stopping": bool}


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """The proxy's event loop: ``auto``/``asyncio`` (asyncio's, waiting on the engine's
    epoll set) or ``uvloop`` (python3-uvloop)."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit("flyproxy: --loop uvloop: uvloop is not installed "
                             "(Debian package python3-uvloop)") from None
        return uvloop.new_event_loop()
    return asyncio.SelectorEventLoop(EngineSelector())


def run(coro, kind: str = "auto"):
    """asyncio.run on :func:`new_event_loop`."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(coro)


def adopt(loop, engine: Engine) -> EngineSelector | None:
    """If ``loop`` waits on an EngineSelector not yet taken, make ``engine`` its engine."""
    selector = getattr(loop, "_selector", None)
    if isinstance(selector, EngineSelector) and selector.engine is None:
        selector.engine = engine
        selector.loop = loop
        return selector
    return None


def check(loop: asyncio.AbstractEventLoop) -> list[str]:
    """What this Python's asyncio no longer has of what EngineSelector reads ([] if all)."""
    return [f"{name}: expected {kind.__name__}, found {type(getattr(loop, name, None)).__name__}"
            for name, kind in INTERNALS.items()
            if not isinstance(getattr(loop, name, None), kind)]


class EngineSelector(selectors.EpollSelector):
    """asyncio's epoll selector, sharing its epoll set with the :class:`Engine`.

    ``select()`` hands the relay's events to the engine as they come, and returns to the
    loop only when the loop has something to do: an event of its own, a callback made
    ready or a timer added by a handler (a connect timeout, a DNS task), or its timeout.
    So a busy proxy runs one ``epoll_wait`` per wakeup and no loop iteration around it.
    """

    engine: Engine | None = None
    loop = None  # set with the engine

    @property
    def epoll(self) -> select.epoll:
        return self._selector  # selectors.EpollSelector's own epoll object

    def release(self) -> None:
        """The engine is gone: a plain epoll selector again."""
        self.engine = None

    def select(self, timeout=None):
        loop = self.loop
        if loop is None:  # (no engine yet)
            return super().select(timeout)
        deadline = None if timeout is None else _monotonic() + max(timeout, 0)
        scheduled = len(loop._scheduled)
        fd_to_key = self._fd_to_key
        poll = self._selector.poll
        while True:
            if deadline is None:
                ms = -1
            else:
                ms = deadline - _monotonic()
                ms = 0 if ms <= 0 else math.ceil(ms * 1e3) * 1e-3
            try:
                fd_events = poll(ms, MAX_EVENTS + len(fd_to_key))
            except InterruptedError:
                return []
            if not fd_events:
                break  # the timeout
            if self.engine is not None:
                fd_events = self.engine.dispatch(fd_events)
            if fd_events or ms == 0 or loop._ready or loop._stopping or \
                    len(loop._scheduled) != scheduled:
                break
        ready = []
        for fd, event in fd_events:
            key = fd_to_key.get(fd)
            if key:
                events = (selectors.EVENT_WRITE if event & ~select.EPOLLIN else 0) | \
                    (selectors.EVENT_READ if event & ~select.EPOLLOUT else 0)
                ready.append((key, events & key.events))
        return ready
