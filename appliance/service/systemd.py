"""What the service needs from systemd (python3-systemd): the sockets it hands over
(LISTEN_FDS) and the state it is told (sd_notify). Outside systemd both are no-ops."""

from __future__ import annotations

import os


def notify(*lines: str) -> None:
    """Tell systemd about our state (READY=1, RELOADING=1, STATUS=...); a no-op outside it."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
    except ImportError:  # pragma: no cover - python3-systemd is a dependency of the appliance
        return
    daemon.notify("\n".join(lines))


def systemd_fds() -> list[int]:
    """The fds systemd passed us (LISTEN_FDS), or [] when not socket-activated."""
    if "LISTEN_FDS" not in os.environ:
        return []
    from systemd import daemon  # python3-systemd; only needed under systemd
    return list(daemon.listen_fds(unset_environment=True))
