"""What the service needs from systemd (python3-systemd): the sockets it hands over
(LISTEN_FDS) and the state it is told (sd_notify, written here: python3-systemd's blocks
when the socket's queue is full). Outside systemd both are no-ops."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> None:
    """Tell systemd about our state (READY=1, RELOADING=1, STATUS=...); a no-op outside it.

    Sent without blocking (sd_notify's protocol: one datagram to $NOTIFY_SOCKET): the
    event loop never waits on a reader that is behind; a message that finds the socket's
    queue full is dropped, and said so."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, path)
    except BlockingIOError:
        log.warning("sd_notify: the notify socket's queue is full; dropped %s", lines[0])
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", path, e)


def systemd_fds() -> list[int]:
    """The fds systemd passed us (LISTEN_FDS), or [] when not socket-activated."""
    if "LISTEN_FDS" not in os.environ:
        return []
    from systemd import daemon  # python3-systemd; only needed under systemd
    return list(daemon.listen_fds(unset_environment=True))
