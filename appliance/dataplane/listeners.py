"""Where listening sockets come from: bound here per port, or handed in.

Kept apart from what happens to a connection (``proxy.py``): the proxy takes
sockets, whoever made them.
"""

from __future__ import annotations

import socket
import sys

BACKLOG = 4096  # connections; the kernel caps it at net.core.somaxconn
# With handed-in sockets, a supervisor's workers accept in this many lanes (an SO_REUSEPORT
# group each) that the BPF program steers apps to: an accept queue per app, up to LANES
# apps (bpf/steer.c FLYPROXY_LANES)
LANES = 16


class ListenerError(Exception):
    pass


def keepalive(sock: socket.socket, idle_s: float, interval_s: float, probes: int) -> None:
    """TCP keepalive on ``sock``: probes after ``idle_s`` without traffic, every
    ``interval_s``, ``probes`` unanswered ones and the connection is reset. Set on a
    listening socket, every connection it accepts inherits it (no call per connection)."""
    if idle_s <= 0:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle_s)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(interval_s)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, max(1, probes))


def bind(port: int, host: str | None = None, backlog: int = BACKLOG,
         reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on ``host:port``; with no host (or ``::``), dual-stack on every address.

    Then we bind ``::`` with IPV6_V6ONLY off (IPv4 and IPv6 on one socket), and
    fall back to ``0.0.0.0`` where the host has no IPv6. With ``reuse_port`` (more
    than one worker) each worker binds its own socket on the port and the kernel
    spreads new connections over them.
    """
    if not host or host == "::":
        try:
            return _listen(socket.AF_INET6, ("::", port), backlog, dual_stack=True,
                           reuse_port=reuse_port)
        except OSError as e:
            if e.errno not in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6 here
                raise
            host = "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _listen(family, (host, port), backlog, reuse_port=reuse_port)


def _listen(family: int, addr: tuple, backlog: int, dual_stack: bool = False,
            reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def from_fd(fd: int) -> socket.socket:
    """Adopt an inherited fd; it must be a listening TCP socket (family is detected)."""
    sock = _adopt(fd)
    check_listening_tcp(sock, f"fd {fd}")
    return sock


def _adopt(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ListenerError(f"fd {fd} is not a socket: {e.strerror}") from None
    sock.setblocking(False)
    return sock


SO_COOKIE = 57  # linux/socket.h: a socket's unique id (not in Python's socket module)


def cookie(sock: socket.socket) -> int:
    """The kernel's id of the socket: the same in every process holding it (what the BPF
    maps and ``flyproxy bpf register`` compare)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), sys.byteorder)


def described(socks: list[socket.socket]) -> list[dict]:
    """The handed-in listeners as status shows them: address and cookie."""
    rows = []
    for s in socks:
        if s.fileno() == -1:  # closed: a draining proxy has stopped listening
            continue
        host, port = s.getsockname()[:2]
        rows.append({"address": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                     "cookie": cookie(s)})
    return rows


def check_listening_tcp(sock: socket.socket, what: str) -> None:
    """Raise ListenerError unless ``sock`` is a listening IPv4/IPv6 TCP socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ListenerError(f"{what} is not an IPv4/IPv6 socket (family {sock.family!r})")
    if sock.type != socket.SOCK_STREAM:
        raise ListenerError(f"{what} is not a TCP (stream) socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ListenerError(f"{what} is not listening")
