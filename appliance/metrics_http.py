"""The /metrics endpoint, served on the event loop: no thread, no fd per idle client.

prometheus_client's own server spends a thread and an fd per connection, with no cap
and no deadline: any local user holding idle connections to it could take every fd the
data plane needs to accept. This one is a small HTTP/1.1 responder on asyncio:

- at most MAX_CLIENTS connections at once; more are closed at once;
- the request (line and headers, at most HEADER_LIMIT bytes) must arrive within
  READ_DEADLINE_S, the answer must be taken within WRITE_DEADLINE_S;
- a new connection is closed at once while the process has fewer than RESERVE_FDS file
  descriptors left (they are the data plane's), and accept() itself pauses on EMFILE
  (asyncio's own handling): never a busy loop;
- GET (or HEAD) /metrics answers the text exposition format; anything else 404 or 405;
  one request per connection (Connection: close).

The body comes from ``render``, a coroutine function: a single process renders its own
counters; a supervisor first gathers its workers' (see service/supervisor.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
HEADER_LIMIT = 8 * 1024
READ_DEADLINE_S = 5.0
WRITE_DEADLINE_S = 10.0
RESERVE_FDS = 64
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bind(host: str, port: int) -> socket.socket:
    """The endpoint's listening socket, bound now (so a bad address fails at startup)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=MAX_CLIENTS * 2)
    sock.setblocking(False)
    return sock


def fds() -> tuple[int, int]:
    """(file descriptors open in this process, its limit: RLIMIT_NOFILE's soft value)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        return len(os.listdir("/proc/self/fd")), soft
    except OSError:  # no /proc: assume there is room
        return 0, soft


def fds_left() -> int:
    """File descriptors this process may still open."""
    used, limit = fds()
    return limit - used


class MetricsServer:
    """Serves ``render()`` on ``sock`` (see the module doc for the limits)."""

    def __init__(self, sock: socket.socket, render: Callable[[], Awaitable[bytes]]) -> None:
        self.sock = sock
        self.render = render
        self.clients = 0
        self.refused = 0  # connections closed at once (over the cap, or fds short)
        self._server: asyncio.AbstractServer | None = None

    def __repr__(self) -> str:
        return f"<MetricsServer {self.sock.getsockname()[:2]} clients={self.clients}>"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.sock,
                                                  limit=HEADER_LIMIT)
        host, port = self.sock.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= MAX_CLIENTS or fds_left() < RESERVE_FDS:
            self.refused += 1
            writer.transport.abort()
            return
        self.clients += 1
        try:
            async with asyncio.timeout(READ_DEADLINE_S):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body = await self._respond(head)
            headers = (f"HTTP/1.1 {status}\r\nContent-Type: "
                       f"{CONTENT_TYPE if status.startswith('200') else 'text/plain'}\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            if head.startswith(b"HEAD "):
                body = b""
            async with asyncio.timeout(WRITE_DEADLINE_S):
                writer.write(headers + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # slow, short, huge or gone: dropped
        except Exception:  # a bug in rendering must not take the proxy down
            log.exception("metrics: could not answer a scrape")
        finally:
            self.clients -= 1
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # a reader that does not take the answer
            else:
                writer.close()

    async def _respond(self, head: bytes) -> tuple[str, bytes]:
        try:
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except ValueError:
            return "400 Bad Request", b"bad request\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n"
        if target.split("?", 1)[0] not in ("/metrics", "/"):
            return "404 Not Found", b"GET /metrics\n"
        return "200 OK", await self.render()
