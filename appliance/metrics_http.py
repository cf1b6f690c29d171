"""The /metrics endpoint, served on the event loop: no thread, no fd per idle client.

prometheus_client's own server spends a thread and an fd per connection, with no cap
and no deadline: any local user holding idle connections to it could take every fd the
data plane needs to accept. This one is a small HTTP/1.1 responder on asyncio:

- at most MAX_CLIENTS connections at once. At the cap, a new connection makes room by
  closing the oldest one still sending its request (else the oldest whose answer its
  client does not take); only while every slot holds a request being rendered is it
  closed at once. Idle or slow clients (slowloris) thus cannot keep a scraper out;
- the request (line and headers, at most HEADER_LIMIT bytes, else 431) must arrive within
  READ_DEADLINE_S, the answer must be taken within WRITE_DEADLINE_S; lines may end in
  CRLF or a bare LF (RFC 9112 section 2.2);
- a new connection is closed at once while the process has fewer than RESERVE_FDS file
  descriptors left (they are the data plane's: counted at most once per FDS_SAMPLE_S,
  as listing them costs time in proportion to their number), and accept() itself pauses
  on EMFILE (asyncio's own handling): never a busy loop;
- GET (or HEAD) /metrics answers the text exposition format, GET / the status page
  (statuspage.py: HTML, no script, reloaded by the browser every REFRESH_S); anything
  else 404 or 405; one request per connection (Connection: close).

The body comes from ``render``, a coroutine function: a single process renders its own
counters; a supervisor first gathers its workers' (see service/supervisor.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from typing import Awaitable, Callable

from .logs import RateLimited
from .statuspage import REFRESH_S

log = logging.getLogger(__name__)

MAX_CLIENTS = 8
HEADER_LIMIT = 8 * 1024  # bytes: the request line and headers
READ_DEADLINE_S = 2.0
WRITE_DEADLINE_S = 10.0
LINGER_S = 1.0  # after a 431: how long the rest of the request is read (and discarded)
RESERVE_FDS = 64
FDS_SAMPLE_S = 1.0  # fds_left() lists /proc/self/fd at most this often
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# the status page: HTML that runs no script and loads nothing (even a text the escaping
# missed could not), read again every REFRESH_S
PAGE_HEADERS = ("Content-Type: text/html; charset=utf-8\r\n"
                f"Refresh: {REFRESH_S}\r\nCache-Control: no-store\r\n"
                "X-Content-Type-Options: nosniff\r\nContent-Security-Policy: "
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:\r\n")


class HeadTooLarge(Exception):
    """The request line and headers are longer than HEADER_LIMIT."""


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


_sampled = (float("-inf"), (0, 0))  # (time.monotonic() of the last listing, its fds())


def sampled_fds() -> tuple[int, int]:
    """fds() as counted at most FDS_SAMPLE_S ago: listing 9,000 fds costs milliseconds of
    CPU, and a connect loop used to pay one listing per connection."""
    global _sampled
    now = time.monotonic()
    if now - _sampled[0] >= FDS_SAMPLE_S:
        _sampled = (now, fds())
    return _sampled[1]


def fds_left() -> int:
    """File descriptors this process may still open (as sampled_fds() counts them)."""
    used, limit = sampled_fds()
    return limit - used


async def read_head(reader: asyncio.StreamReader) -> list[bytes]:
    """The request line and header lines, without their CRLF or bare LF; raises
    HeadTooLarge past HEADER_LIMIT bytes, IncompleteReadError if the client stops short.
    Empty lines before the request line are skipped (RFC 9112 section 2.2)."""
    lines: list[bytes] = []
    size = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:  # one line longer than the reader's limit
            raise HeadTooLarge from None
        size += len(line)
        if size > HEADER_LIMIT:
            raise HeadTooLarge
        line = line.rstrip(b"\r\n")
        if line:
            lines.append(line)
        elif lines:
            return lines


class MetricsServer:
    """Serves ``render()`` on ``sock`` (see the module doc for the limits).

    Each connection is in ``reading`` (its request not complete yet: oldest first) until
    its head is read, then in ``answering`` (rendering, then writing) until it closes; a
    connection closed to make room leaves its set at once."""

    def __init__(self, sock: socket.socket, render: Callable[[], Awaitable[bytes]]) -> None:
        self.sock = sock
        self.render = render
        self.page: Callable[[], Awaitable[bytes]] | None = None  # GET /: set by its owner
        self.reading: dict[asyncio.BaseTransport, None] = {}  # ordered: oldest first
        self.answering: dict[asyncio.BaseTransport, None] = {}
        self.evicted = 0  # connections closed to make room for a new one
        self._server: asyncio.AbstractServer | None = None
        self._errors = RateLimited(log)  # a render that fails, once per 10 s per kind

    @property
    def clients(self) -> int:
        return len(self.reading) + len(self.answering)

    def __repr__(self) -> str:
        return (f"<MetricsServer {self.sock.getsockname()[:2]} reading={len(self.reading)} "
                f"answering={len(self.answering)}>")

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self.sock,
                                                  limit=HEADER_LIMIT)
        host, port = self.sock.getsockname()[:2]
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _admit(self) -> bool:
        """Room for a new connection? At the cap, make it (the cap is checked first: it
        costs nothing, and there a newcomer replaces a connection, fds unchanged)."""
        if self.clients < MAX_CLIENTS:
            return fds_left() >= RESERVE_FDS
        victim = next(iter(self.reading), None)
        if victim is not None:
            del self.reading[victim]
        else:  # every request complete: one whose client does not take its answer
            victim = next((t for t in self.answering if t.get_write_buffer_size()), None)
            if victim is None:
                return False  # all are being rendered: those end on their own
            del self.answering[victim]
        self.evicted += 1
        victim.abort()
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        if not self._admit():  # every slot busy rendering, or fds short: closed at once
            transport.abort()
            return
        self.reading[transport] = None
        try:
            try:
                async with asyncio.timeout(READ_DEADLINE_S):
                    head = await read_head(reader)
            except HeadTooLarge:
                await self._refuse_head(reader, writer)
                return
            if transport not in self.reading:
                return  # closed to make room while its last line was on its way
            del self.reading[transport]
            self.answering[transport] = None
            status, fields, body = await self._respond(head[0])
            headers = (f"HTTP/1.1 {status}\r\n{fields}Content-Length: {len(body)}\r\n"
                       f"Connection: close\r\n\r\n").encode()
            if head[0].startswith(b"HEAD "):
                body = b""
            async with asyncio.timeout(WRITE_DEADLINE_S):
                writer.write(headers + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # slow, short, closed to make room, or gone: dropped
        except Exception:  # a bug in rendering must not take the proxy down
            log.exception("metrics: could not answer a scrape")
        finally:
            self.reading.pop(transport, None)
            self.answering.pop(transport, None)
            if transport.get_write_buffer_size():
                transport.abort()  # a reader that does not take the answer
            else:
                writer.close()

    @staticmethod
    async def _refuse_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """431, then the rest of the request read and discarded for up to LINGER_S (closing
        with it unread would reset the connection, and the client could lose the 431)."""
        body = b"request header fields too large\n"
        writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: "
                     b"text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (len(body), body))
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(65536):
                pass

    async def _respond(self, request_line: bytes) -> tuple[str, str, bytes]:
        """(status, header lines, body) for one request."""
        plain = "Content-Type: text/plain\r\n"
        try:
            method, target, _ = request_line.decode("latin-1").split(" ", 2)
        except ValueError:
            return "400 Bad Request", plain, b"bad request\n"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", plain, b"GET /metrics\n"
        path = target.split("?", 1)[0]
        try:
            if path == "/metrics":
                return "200 OK", f"Content-Type: {CONTENT_TYPE}\r\n", await self.render()
            if path == "/" and self.page is not None:
                return "200 OK", PAGE_HEADERS, await self.page()
        except Exception as e:  # a bug: the client is told, and the log says what
            self._errors.error(type(e).__name__, "rendering %s failed: %r", path, e)
            return ("500 Internal Server Error", plain,
                    b"the page could not be rendered; the log says why\n")
        return "404 Not Found", plain, b"GET /metrics\n"
