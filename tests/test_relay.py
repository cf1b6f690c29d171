"""The relay: byte-exact both ways, half-close, backpressure, resets."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from helpers import (closed_by_peer, connect, fds_of, free_ports, pipes_of, read_line, recv_all,
                     scripted_backend, wait_until, write_config)

SPLICE = {"default": [],  # splice() from 1 MiB on: the switch happens mid-transfer
          "never": ["--splice-after", "0"],  # recv() and send() only
          "at-once": ["--splice-after", "1"]}  # splice() from the first byte on


@pytest.fixture(params=list(SPLICE))
def relay_proxy(start_proxy, request):
    """Every relay test on each data path (recv/send, splice(), and the switch between),
    each on both event loops."""
    def start(config, *args, **kw):
        return start_proxy(config, *args, *SPLICE[request.param], **kw)
    return start


def proxy_to(tmp_path, relay_proxy, backend_address):
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend_address])})
    return relay_proxy(cfg), port


def test_multi_mib_transfer_is_byte_exact_both_ways(tmp_path, relay_proxy, make_backend):
    backend = make_backend("echo")
    proxy, port = proxy_to(tmp_path, relay_proxy, backend.address)
    payload = os.urandom(8 * 1024 * 1024)
    with connect(port) as s:
        assert read_line(s) == b"echo"
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        received = recv_all(s)
        sender.join(10)
    assert received[:len(payload)] == payload
    assert received[len(payload):] == b"bye\n"


def test_half_close_reaches_the_backend_and_it_can_still_answer(tmp_path, relay_proxy, make_backend):
    backend = make_backend("echo")
    proxy, port = proxy_to(tmp_path, relay_proxy, backend.address)
    with connect(port) as s:
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)  # our FIN must travel to the backend
        assert recv_all(s) == b"echo\nping\nbye\n"  # answered after our EOF
    assert backend.eofs == 1


def test_backend_half_close_reaches_the_client(tmp_path, relay_proxy):
    """The backend sends and shuts down its write side; the client can still send to it."""
    got = []

    def backend(conn):
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))

    with scripted_backend(backend) as address:
        proxy, port = proxy_to(tmp_path, relay_proxy, address)
        with connect(port) as s:
            assert recv_all(s) == b"hello"  # EOF from the backend arrived
            s.sendall(b"still talking")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b""
    assert got == [b"still talking"]


def test_slow_reader_keeps_proxy_memory_bounded(tmp_path, relay_proxy):
    """The backend pushes 1 GiB to a client that does not read: the proxy must not buffer it."""
    total = 1024 * 1024 * 1024
    sent = [0]
    blocked = threading.Event()

    def backend(conn):
        chunk = b"x" * 65536
        conn.settimeout(0.5)
        while sent[0] < total:
            try:
                conn.sendall(chunk)
            except TimeoutError:
                blocked.set()  # our send blocked for 0.5 s: the proxy stopped reading us
                conn.settimeout(30)
                continue
            sent[0] += len(chunk)

    with scripted_backend(backend) as address:
        proxy, port = proxy_to(tmp_path, relay_proxy, address)
        before = proxy.rss_kib()
        with connect(port, timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            assert blocked.wait(20), "backend was never slowed down: no backpressure"
            assert sent[0] < total / 4
            grown = proxy.rss_kib() - before
            assert grown < 16 * 1024, f"proxy grew by {grown} KiB for one stalled connection"
            # Now read everything: backpressure released, all bytes arrive.
            received = 0
            while received < total:
                data = s.recv(1 << 20)
                assert data, f"closed after {received} bytes"
                received += len(data)
        assert received == total


RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close() resets


def reset_after_sending(conn: socket.socket, data: bytes) -> None:
    """Send ``data``, wait (bounded) until the peer's kernel has it all, then reset."""
    conn.sendall(data)
    wait_until(lambda: _unsent(conn) == 0, "the data acknowledged before the reset")
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
    conn.close()


def _unsent(sock: socket.socket) -> int:
    import fcntl
    import struct
    import termios
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def read_until_reset(sock: socket.socket) -> tuple[int, str]:
    """Read until the connection ends: (bytes read, "reset" or "eof")."""
    total = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return total, "reset"
        if not chunk:
            return total, "eof"
        total += len(chunk)


def test_backend_reset_reaches_the_client_as_a_reset_after_its_bytes(tmp_path, relay_proxy):
    """The backend sends 200,000 bytes and resets: the client gets all 200,000, then
    ECONNRESET, as it would without the proxy (not a clean EOF, and nothing dropped from
    what sat in the proxy's buffer or pipe)."""
    def backend(conn):
        assert conn.recv(1) == b"?"  # (our connect is done: the reset is not the connect's)
        reset_after_sending(conn, os.urandom(200_000))

    with scripted_backend(backend) as address:
        proxy, port = proxy_to(tmp_path, relay_proxy, address)
        with connect(port, timeout=10) as s:
            s.sendall(b"?")
            assert read_until_reset(s) == (200_000, "reset")
    wait_until(lambda: "end=backend-reset" in proxy.output(), "the log line says how it ended")


def test_a_slow_client_still_gets_every_byte_before_the_reset(tmp_path, relay_proxy):
    """The client reads slowly (a small receive buffer): the proxy still holds bytes for it
    when the backend resets; they are delivered, then the reset."""
    payload = os.urandom(3 << 20)

    def backend(conn):
        assert conn.recv(1) == b"?"
        reset_after_sending(conn, payload)

    with scripted_backend(backend) as address:
        proxy, port = proxy_to(tmp_path, relay_proxy, address)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        with s:
            s.sendall(b"?")
            assert read_until_reset(s) == (len(payload), "reset")


def test_client_reset_closes_the_backend(tmp_path, relay_proxy):
    ended = threading.Event()

    def backend(conn):
        conn.sendall(b"hi\n")
        try:
            while conn.recv(100):
                pass
        finally:
            ended.set()

    with scripted_backend(backend) as address:
        proxy, port = proxy_to(tmp_path, relay_proxy, address)
        s = connect(port, timeout=5)
        assert read_line(s) == b"hi"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        assert ended.wait(5), "backend still open after the client reset"


def test_data_sent_while_the_backend_connects_is_kept_bounded_and_exact(tmp_path, relay_proxy):
    """The client talks before the backend has accepted: the proxy holds a bounded amount
    (then stops reading the client) and delivers every byte once connected."""
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(0)
    filler = socket.create_connection(backend.getsockname(), timeout=5)  # accept queue full:
    port, = free_ports(1)  # the proxy's SYN is dropped and retried a second later
    target = f"127.0.0.1:{backend.getsockname()[1]}"
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [target])})
    relay_proxy(cfg, "--connect-timeout", "10")
    with connect(port) as s, backend, filler:
        s.settimeout(0.5)  # a send blocked this long: the proxy stopped reading us
        chunk, sent = os.urandom(65536), []
        try:
            for _ in range(1024):  # at most 64 MiB
                sent.append(chunk[:s.send(chunk)])
        except TimeoutError:
            pass
        payload = b"".join(sent)
        assert len(payload) < 32 * 1024 * 1024, "the proxy read everything the client sent"
        backend.settimeout(10)
        backend.accept()[0].close()  # free the queue: the proxy's retried SYN gets in
        conn, _ = backend.accept()
        s.settimeout(10)
        s.shutdown(socket.SHUT_WR)
        with conn:
            conn.settimeout(10)
            assert recv_all(conn) == payload


def _echo(s: socket.socket, data: bytes) -> bytes:
    sender = threading.Thread(target=s.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    sender.join(10)
    return bytes(got)


def test_a_bulk_connection_moves_to_splice_after_the_threshold_and_frees_it_all(
        tmp_path, start_proxy, make_backend):
    backend = make_backend("echo")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    proxy = start_proxy(cfg, "--splice-after", str(1 << 20))
    fds_before, pipes_before = len(fds_of(proxy.pid)), pipes_of(proxy.pid)
    with connect(port) as s:
        assert read_line(s) == b"echo"
        small = os.urandom(100_000)
        assert _echo(s, small) == small
        assert pipes_of(proxy.pid) == pipes_before  # a short exchange never pays for a pipe
        bulk = os.urandom(3 << 20)
        assert _echo(s, bulk) == bulk
        # a pipe (two fds) for each direction that found its peer's buffer empty past the
        # threshold: both, nearly always; one at the least
        assert pipes_of(proxy.pid) in (pipes_before + 2, pipes_before + 4)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"bye\n"  # half-close still travels both ways
    # the proxy closes its side after ours: pipes and dups all closed
    wait_until(lambda: len(fds_of(proxy.pid)) <= fds_before, "every fd of the connection closed")


def test_an_idle_timeout_resets_both_sides(tmp_path, start_proxy):
    """An idle close is an abort: both sides see a reset, never a clean end of stream
    (a stalled download cut at the idle timeout must not look complete)."""
    backend_saw = []

    def backend(conn):
        conn.sendall(b"hi\n")
        backend_saw.append(read_until_reset(conn)[1])

    with scripted_backend(backend) as address:
        port, = free_ports(1)
        cfg = write_config(tmp_path / "config.json", {"a": ([port], [address])})
        proxy = start_proxy(cfg, "--idle-timeout", "1")
        with connect(port, timeout=10) as s:
            assert read_line(s) == b"hi"
            assert read_until_reset(s) == (0, "reset")
    assert backend_saw == ["reset"]
    wait_until(lambda: "end=idle" in proxy.output(), "the log line says why it ended")


def test_an_orderly_end_stays_an_orderly_end(tmp_path, relay_proxy, make_backend):
    backend = make_backend("echo")
    proxy, port = proxy_to(tmp_path, relay_proxy, backend.address)
    with connect(port) as s:
        s.sendall(b"x\n")
        s.shutdown(socket.SHUT_WR)
        assert read_until_reset(s) == (len(b"echo\nx\nbye\n"), "eof")
    wait_until(lambda: "end=closed" in proxy.output(), "the log line says it closed")
