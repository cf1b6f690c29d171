"""The host's active health checks (``dataplane/checks.py``) with the addresses of their
host-name targets: one :class:`HostChecks` per host, in the process that owns the config.

A single process checks with its proxy's resolver (it resolves every target already); a
supervisor has no proxy, so it resolves the checked targets' names itself. Either way a
change reaches ``on_change`` as a batch of (app, target, up).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from ..config import Config, Target
from ..dataplane.checks import Change, Checker
from ..dataplane.resolver import Resolver
from ..settings import ServeConfig


class HostChecks:
    def __init__(self, settings: ServeConfig, on_change: Callable[[list[Change]], None],
                 resolver: Resolver | None = None) -> None:
        self._own = resolver is None
        self.resolver = resolver or Resolver(asyncio.get_running_loop(), settings)
        self.checker = Checker(self._addresses, on_change)

    def __repr__(self) -> str:
        return f"<HostChecks {self.checker!r}>"

    def apply(self, config: Config) -> None:
        """Check what ``config`` asks for (keeping the state of targets checked before)."""
        if self._own:
            self.resolver.track(t.host for a in config.apps if a.health_check
                                for t in a.targets if t.addrs is None)
        self.checker.apply(config)

    def _addresses(self, target: Target) -> list:
        name = self.resolver.names.get(target.host)
        return name.sockaddrs(target.port) if name is not None and name.addrs else []

    def state(self) -> list[dict]:
        return self.checker.state()

    def down_changes(self) -> list[Change]:
        return self.checker.down_changes()

    def close(self) -> None:
        self.checker.close()
        if self._own:
            self.resolver.close()
