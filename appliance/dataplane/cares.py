"""c-ares (``python3-pycares``) driven by the event loop: its sockets are watched with the
loop's ``add_reader``/``add_writer`` and its timeouts by one loop timer, so DNS queries
need no thread.

:class:`Channel` asks A and AAAA for a name and calls back once with both answers, as
``{family: (records or None, error or None)}``; it reads ``/etc/resolv.conf`` (name
servers, search domains, ndots) when it is made.
"""

from __future__ import annotations

import socket
from typing import Callable

try:
    import pycares
    import pycares.errno as errno
except ImportError:  # pragma: no cover - python3-pycares is a dependency of the appliance
    pycares = errno = None

AF_INET, AF_INET6 = socket.AF_INET, socket.AF_INET6
NXDOMAIN = errno.ARES_ENOTFOUND if errno is not None else None

# pycares 4 parses an A or AAAA answer into an array of PYCARES_ADDRTTL_SIZE (256) records
# and drops the rest without a word: a name with 1,000 addresses kept 256 of them. It reads
# that module global on every answer, so it is raised here to what any answer can hold: a
# DNS message is at most 65,535 bytes (over TCP) and an address record at least 15 (a
# 1-byte name, 10 bytes of type/class/TTL/length, 4 of address), so 4,369 records. The
# arrays cost about 120 KB per lookup, for an instant.
MAX_RECORDS = 65535 // 15
if pycares is not None and getattr(pycares, "PYCARES_ADDRTTL_SIZE", MAX_RECORDS) < MAX_RECORDS:
    pycares.PYCARES_ADDRTTL_SIZE = MAX_RECORDS


def reason(error: int) -> tuple[str, str]:
    """A c-ares error -> (metrics result, the reason shown in status and logs)."""
    if error in (errno.ARES_ENOTFOUND, errno.ARES_ENODATA):
        return "nxdomain", "nxdomain" if error == errno.ARES_ENOTFOUND else "no address"
    if error == errno.ARES_ETIMEOUT:
        return "timeout", "timeout"
    # c-ares (1.18) reports a SERVFAIL or REFUSED answer from every server, and a server
    # that is not listening, all as ECONNREFUSED: one result, "servfail".
    if error in (errno.ARES_ESERVFAIL, errno.ARES_ECONNREFUSED, errno.ARES_EREFUSED):
        return "servfail", "servfail or unreachable"
    return "error", errno.errorcode.get(error, str(error)).removeprefix("ARES_E").lower()


def is_negative(error: int) -> bool:
    """An answer that says the name has no such address (not a resolver failure)."""
    return error in (errno.ARES_ENOTFOUND, errno.ARES_ENODATA)


class Channel:
    def __init__(self, loop, timeout_s: float, tries: int) -> None:
        if pycares is None:
            raise RuntimeError("python3-pycares is not installed")
        self.loop = loop
        self._channel = pycares.Channel(sock_state_cb=self._socket_state, timeout=timeout_s,
                                        tries=tries)
        self._fds: dict[int, tuple[bool, bool]] = {}  # c-ares sockets -> (read, write) watched
        self._timer = None  # c-ares' own timeouts
        self.inflight = 0  # queries sent and not answered

    def __repr__(self) -> str:
        return f"<cares.Channel inflight={self.inflight} sockets={len(self._fds)}>"

    def lookup(self, host: str, done: Callable[[dict], None]) -> None:
        """Ask A and AAAA for ``host``; ``done(results)`` once both have answered."""
        results: dict = {}

        def answered(family: int, records, error) -> None:
            self.inflight -= 1
            results[family] = (records, error)
            if len(results) == 2:
                done(results)

        for qtype, family in ((pycares.QUERY_TYPE_AAAA, AF_INET6),
                              (pycares.QUERY_TYPE_A, AF_INET)):
            self.inflight += 1
            self._channel.search(host, qtype, lambda r, e, f=family: answered(f, r, e))
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for fd in list(self._fds):
            self._socket_state(fd, False, False)

    def _socket_state(self, fd: int, readable: bool, writable: bool) -> None:
        """c-ares' sock_state_cb: what it waits for on ``fd`` now (neither: done with it)."""
        was_r, was_w = self._fds.get(fd, (False, False))
        loop = self.loop
        if readable != was_r:
            if readable:
                loop.add_reader(fd, self._process, fd, True)
            else:
                loop.remove_reader(fd)
        if writable != was_w:
            if writable:
                loop.add_writer(fd, self._process, fd, False)
            else:
                loop.remove_writer(fd)
        if readable or writable:
            self._fds[fd] = (readable, writable)
        else:
            self._fds.pop(fd, None)

    def _process(self, fd: int, read: bool) -> None:
        bad = pycares.ARES_SOCKET_BAD
        self._channel.process_fd(fd if read else bad, bad if read else fd)
        self._arm()

    def _tick(self) -> None:
        self._timer = None
        self._channel.process_fd(pycares.ARES_SOCKET_BAD, pycares.ARES_SOCKET_BAD)
        self._arm()

    def _arm(self) -> None:
        """Have c-ares' next timeout (a query to retry or give up on) handled in time."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.inflight:
            delay = self._channel.timeout()
            self._timer = self.loop.call_later(delay if delay > 0 else 0.05, self._tick)
