"""What every shape of the service shares: a single process (``server.Server``) and a
supervisor (``supervisor.Supervisor``) have one lifecycle.

:meth:`Service.serve`: ``startup()`` (bind or adopt, start what serves, install the
signal handlers), READY=1 to systemd, wait for a stop signal, ``stop_accepting()``,
STOPPING=1, ``shutdown()`` (drain, bounded), the exit status. SIGHUP reloads; the first SIGTERM/SIGINT stops
gracefully, a second one calls ``stop_now()``. A reload's outcome is reported one way
(:meth:`reloaded`, :meth:`reload_failed`): logged, counted, told to systemd, kept for
status (``last_reload``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Callable

from ..settings import ServeConfig
from .systemd import notify


class Service:
    def __init__(self, settings: ServeConfig) -> None:
        self.settings = settings
        self.config_path = settings.config
        self.grace_s = settings.grace_period_s
        self.watcher = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._exit = 0
        self._tasks: set[asyncio.Task] = set()
        self.last_reload: dict | None = None  # {"ok", "at" (Unix time), "message"}: status
        self.log = logging.getLogger(type(self).__module__)

    # -- what each shape says for itself ---------------------------------------------------

    async def startup(self) -> bool:
        """Start serving; False to give up (``_exit`` says how)."""
        raise NotImplementedError

    def stop_accepting(self) -> None:
        """Close the listeners (before STOPPING=1 is said: from then on a new connection
        is refused) and what else takes requests."""
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Let open connections finish (bounded), end the rest."""
        raise NotImplementedError

    def stop_now(self) -> None:
        """A second stop signal: end what is left now."""
        raise NotImplementedError

    def status_line(self) -> str:
        raise NotImplementedError

    def count_reload(self, ok: bool) -> None:
        raise NotImplementedError

    async def reload(self) -> tuple[bool, str]:
        raise NotImplementedError

    # -- the lifecycle -------------------------------------------------------------------

    async def serve(self) -> int:
        if not await self.startup():
            return self._exit
        notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        await self._stop.wait()
        if self.watcher is not None:
            self.watcher.close()
        self.stop_accepting()
        notify("STOPPING=1", "STATUS=draining connections")
        await self.shutdown()
        self.log.info("stopped")
        return self._exit

    def install_signals(self, *, interrupt: bool = True) -> None:
        """SIGHUP reloads, SIGTERM (and SIGINT, unless ``interrupt`` is False: a worker's
        Ctrl-C is its supervisor's) stops."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, signal.SIGTERM)
        if interrupt:
            loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, signal.SIGINT)
        else:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            self.log.info("%s: shutting down gracefully (send again to stop at once)",
                          sig.name)
            self._stop.set()
        else:
            self.log.info("%s again: closing all connections now", sig.name)
            self.stop_now()

    def start_watcher(self, digest: Callable[[], str]) -> None:
        """serve --watch: reload when the file changes (unless to the config in force)."""
        if self.settings.watch:
            from .watch import ConfigWatcher
            self.watcher = ConfigWatcher(self.config_path, self.reload, digest)
            self.watcher.start()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only a weak reference to tasks
        task.add_done_callback(self._tasks.discard)
        return task

    # -- a reload's outcome ----------------------------------------------------------------

    def reloaded(self, message: str) -> tuple[bool, str]:
        self.count_reload(True)
        self.last_reload = {"ok": True, "at": time.time(), "message": message}
        self.log.info("%s", message)
        notify("READY=1", f"STATUS={self.status_line()}")
        return True, message

    def reload_failed(self, message: str) -> tuple[bool, str]:
        self.count_reload(False)
        self.last_reload = {"ok": False, "at": time.time(), "message": message}
        self.log.error("%s", message)
        notify("READY=1", f"STATUS=reload failed; {self.status_line()}")
        return False, message
