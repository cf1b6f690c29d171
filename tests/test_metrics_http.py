"""The /metrics endpoint under abuse: idle clients cannot keep a scraper out, requests are
read as HTTP/1.x allows, oversized headers are answered 431, and a connect loop does not
make the proxy list its fds on every connection.

The first tests run the real proxy (single process and with workers: the supervisor serves
the same endpoint); the last ones run the endpoint in the test's own event loop, where its
/proc/self/fd listings can be counted and its connection states seen.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time

import pytest

from appliance import metrics_http
from helpers import free_ports, recv_all, write_config

HUGE_HEADER = b"X: " + b"y" * (9 * 1024) + b"\r\n"
MANY_HEADERS = b"".join(b"X-%d: %s\r\n" % (i, b"y" * 100) for i in range(90))  # ~9.5 KiB


def proxy_with_metrics(tmp_path, start_proxy, make_backend, *args: str) -> int:
    """A proxy serving /metrics (and one app); returns the metrics port."""
    backend = make_backend("b")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}", *args)
    return metrics_port


def ask(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` on a new connection; the whole answer (b"" if closed or reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(request)
            return recv_all(s)
        except ConnectionResetError:
            return b""


def slowloris(port: int) -> socket.socket:
    """A connection that has sent one byte of a request and then waits."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"G")
    return s


def closed(sock: socket.socket) -> bool:
    """Has the peer closed or reset ``sock`` (without waiting)?"""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("mode", [(), ("--workers", "2")], ids=["single", "workers"])
def test_idle_connections_holding_every_slot_do_not_keep_a_scraper_out(
        tmp_path, start_proxy, make_backend, mode):
    """Twice the cap of one-byte connections, each re-opened as soon as the proxy closes it
    (the attack re-opened them every 5 s, the read deadline, and 0 of 30 scrapes got
    through): 30 scrapes in a row all get their answer."""
    metrics_port = proxy_with_metrics(tmp_path, start_proxy, make_backend, *mode)
    attackers: list[socket.socket] = []
    answers = []
    try:
        for _ in range(30):
            for s in [s for s in attackers if closed(s)]:
                attackers.remove(s)
                s.close()
            while len(attackers) < 2 * metrics_http.MAX_CLIENTS:
                attackers.append(slowloris(metrics_port))
            answers.append(ask(metrics_port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))
    finally:
        for s in attackers:
            s.close()
    ok = [a.startswith(b"HTTP/1.1 200 ") and b"flyproxy_connections_accepted" in a
          for a in answers]
    assert all(ok), f"{ok.count(False)} of 30 scrapes failed"


@pytest.mark.parametrize("request_bytes", [
    b"GET /metrics HTTP/1.1\nHost: x\n\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\n\r\n",
    b"\r\nGET /metrics HTTP/1.0\n\n",  # an empty line before the request line is ignored
], ids=["lf", "mixed", "leading-empty-line"])
def test_a_request_whose_lines_end_in_a_bare_lf_is_answered(tmp_path, start_proxy,
                                                            make_backend, request_bytes):
    """RFC 9112 section 2.2: a recipient MAY take a single LF as a line terminator. The
    request used to wait out the read deadline and get no answer; the client's timeout here
    is below that deadline, so an answer at all means it came without waiting for it."""
    metrics_port = proxy_with_metrics(tmp_path, start_proxy, make_backend)
    answer = ask(metrics_port, request_bytes, timeout=0.9 * metrics_http.READ_DEADLINE_S)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"flyproxy_connections_accepted" in answer


@pytest.mark.parametrize("headers", [HUGE_HEADER, MANY_HEADERS], ids=["one-9KiB", "90-short"])
def test_headers_over_the_limit_are_answered_431(tmp_path, start_proxy, make_backend,
                                                 headers):
    metrics_port = proxy_with_metrics(tmp_path, start_proxy, make_backend)
    assert len(headers) > metrics_http.HEADER_LIMIT
    answer = ask(metrics_port, b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    # and headers just under the limit are fine
    fits = b"X: " + b"y" * (metrics_http.HEADER_LIMIT - 100) + b"\r\n"
    assert ask(metrics_port, b"GET /metrics HTTP/1.1\r\n" + fits + b"\r\n").startswith(
        b"HTTP/1.1 200 ")


# -- in the test's own event loop --------------------------------------------------------

async def _served(render):
    server = metrics_http.MetricsServer(metrics_http.bind("127.0.0.1", 0), render)
    await server.start()
    return server, server.sock.getsockname()[1]


async def _scrape(port: int, timeout: float = 10) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\n\r\n")
            return await reader.read()
        finally:
            writer.close()


async def _until(predicate, what: str, timeout: float = 10) -> None:
    """Wait, bounded, for a state of the server the test's own loop changes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def test_a_connect_loop_does_not_list_the_fds_on_every_connection(monkeypatch):
    """Each connection used to list /proc/self/fd (9,000 relayed connections: a connect loop
    cost the proxy 2.3 s of CPU per 10 s). 200 scrapes list it at most once per sampling
    period (plus the first)."""
    listings = []
    for name in ("listdir", "scandir"):
        real = getattr(os, name)

        def counting(path=".", _real=real):
            if str(path).startswith("/proc/self/fd"):
                listings.append(path)
            return _real(path)
        monkeypatch.setattr(os, name, counting)

    async def render() -> bytes:
        return b"x 1\n"

    async def main() -> float:
        server, port = await _served(render)
        try:
            started = time.monotonic()
            for _ in range(200):
                assert (await _scrape(port)).startswith(b"HTTP/1.1 200 ")
            return time.monotonic() - started
        finally:
            server.close()

    took = asyncio.run(main())
    period = getattr(metrics_http, "FDS_SAMPLE_S", 1.0)  # (the code before it had none)
    assert len(listings) <= 2 + took / period, \
        f"{len(listings)} fd listings for 200 connections in {took:.1f}s"


def test_a_request_being_answered_is_not_evicted_by_idle_connections():
    """At the cap, a new connection makes room by closing the oldest one still sending its
    request, never one whose request is complete: a scrape whose answer is being rendered
    (the supervisor gathering its workers' counts) gets it, however many idle clients come."""
    release = asyncio.Event()

    async def render() -> bytes:
        await release.wait()
        return b"x 1\n"

    async def main() -> None:
        server, port = await _served(render)
        idle = []
        try:
            scrape = asyncio.create_task(_scrape(port))
            await _until(lambda: server.answering, "the scrape's request read")
            for _ in range(3 * metrics_http.MAX_CLIENTS):
                idle.append(await asyncio.open_connection("127.0.0.1", port))
                idle[-1][1].write(b"G")
            await _until(lambda: server.evicted >= 2 * metrics_http.MAX_CLIENTS,
                         "idle connections evicted")
            release.set()
            assert (await scrape).startswith(b"HTTP/1.1 200 ")
            assert (await _scrape(port)).startswith(b"HTTP/1.1 200 ")
        finally:
            for _, writer in idle:
                writer.close()
            server.close()

    asyncio.run(main())


def test_clients_that_do_not_take_their_answers_do_not_keep_a_scraper_out():
    """Every slot held by a complete request whose answer the client does not read (its
    receive window shut): a new scraper makes room by closing the oldest of them, instead
    of being refused until their write deadline."""
    body = b"x " + b"1" * (8 << 20) + b"\n"  # more than the kernel buffers of a shut window

    async def render() -> bytes:
        return body

    async def main() -> None:
        server, port = await _served(render)
        stalled = []
        try:
            for _ in range(metrics_http.MAX_CLIENTS):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
                s.send(b"GET /metrics HTTP/1.1\r\n\r\n")
                stalled.append(s)
            await _until(lambda: len(server.answering) == metrics_http.MAX_CLIENTS and all(
                t.get_write_buffer_size() for t in server.answering), "every answer stalled")
            answer = await _scrape(port, timeout=metrics_http.WRITE_DEADLINE_S / 2)
            assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(body)
        finally:
            for s in stalled:
                s.close()
            server.close()

    asyncio.run(main())


def test_a_render_that_fails_is_answered_500_and_the_next_scrape_works():
    """A bug while rendering (once: a file the unit's sandbox hides) must not look like a
    dead endpoint: the scraper gets a 500, the log says why, the next scrape is served."""
    calls = []

    async def render() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", "/proc/stat")
        return b"ok 1\n"

    async def main():
        server, port = await _served(render)
        try:
            first = await _scrape(port)
            assert first.startswith(b"HTTP/1.1 500") or first.startswith(b"HTTP/1.0 500"), first
            assert (await _scrape(port)).endswith(b"ok 1\n")
        finally:
            server.close()

    asyncio.run(main())
