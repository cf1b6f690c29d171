"""The relay: byte-exact both ways, half-close, backpressure, resets."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

from helpers import connect, free_ports, read_line, recv_all, write_config


def proxy_to(tmp_path, start_proxy, backend_address):
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend_address])})
    return start_proxy(cfg), port


def test_multi_mib_transfer_is_byte_exact_both_ways(tmp_path, start_proxy, make_backend):
    backend = make_backend("echo")
    proxy, port = proxy_to(tmp_path, start_proxy, backend.address)
    payload = os.urandom(8 * 1024 * 1024)
    with connect(port) as s:
        assert read_line(s) == b"echo"
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        received = recv_all(s)
        sender.join(10)
    assert received[:len(payload)] == payload
    assert received[len(payload):] == b"bye\n"


def test_half_close_reaches_the_backend_and_it_can_still_answer(tmp_path, start_proxy, make_backend):
    backend = make_backend("echo")
    proxy, port = proxy_to(tmp_path, start_proxy, backend.address)
    with connect(port) as s:
        s.sendall(b"ping\n")
        s.shutdown(socket.SHUT_WR)  # our FIN must travel to the backend
        assert recv_all(s) == b"echo\nping\nbye\n"  # answered after our EOF
    assert backend.eofs == 1


def test_backend_half_close_reaches_the_client(tmp_path, start_proxy):
    """The backend sends and shuts down its write side; the client can still send to it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    got = []

    def backend():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(10)
            got.append(recv_all(conn))

    t = threading.Thread(target=backend)
    t.start()
    try:
        proxy, port = proxy_to(tmp_path, start_proxy, f"127.0.0.1:{srv.getsockname()[1]}")
        with connect(port) as s:
            assert recv_all(s) == b"hello"  # EOF from the backend arrived
            s.sendall(b"still talking")
            s.shutdown(socket.SHUT_WR)
            t.join(10)
        assert got == [b"still talking"]
    finally:
        srv.close()


def test_slow_reader_keeps_proxy_memory_bounded(tmp_path, start_proxy):
    """The backend pushes 1 GiB to a client that does not read: the proxy must not buffer it."""
    total = 1024 * 1024 * 1024
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    sent = [0]

    def backend():
        conn, _ = srv.accept()
        with conn:
            chunk = b"x" * 65536
            conn.settimeout(30)
            try:
                while sent[0] < total:
                    conn.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:
                pass

    t = threading.Thread(target=backend, daemon=True)
    t.start()
    try:
        proxy, port = proxy_to(tmp_path, start_proxy, f"127.0.0.1:{srv.getsockname()[1]}")
        before = proxy.rss_kib()
        with connect(port, timeout=30) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            # Wait until the backend is blocked: its count stops growing.
            deadline, last = time.monotonic() + 10, -1
            while time.monotonic() < deadline and sent[0] != last:
                last = sent[0]
                t.join(0.3)
            assert sent[0] < total / 4, "backend was never slowed down: no backpressure"
            grown = proxy.rss_kib() - before
            assert grown < 16 * 1024, f"proxy grew by {grown} KiB for one stalled connection"
            # Now read everything: backpressure released, all bytes arrive.
            received = 0
            while received < total:
                data = s.recv(1 << 20)
                assert data, f"closed after {received} bytes"
                received += len(data)
        assert received == total
    finally:
        srv.close()


def test_backend_reset_closes_the_client(tmp_path, start_proxy):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def backend():
        conn, _ = srv.accept()
        conn.sendall(b"about to reset\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # linger 0: RST

    t = threading.Thread(target=backend)
    t.start()
    try:
        proxy, port = proxy_to(tmp_path, start_proxy, f"127.0.0.1:{srv.getsockname()[1]}")
        with connect(port, timeout=5) as s:
            t.join(5)
            assert read_line(s) == b"about to reset"
            try:
                rest = s.recv(100)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
    finally:
        srv.close()


def test_client_reset_closes_the_backend(tmp_path, start_proxy):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    ended = threading.Event()

    def backend():
        conn, _ = srv.accept()
        conn.settimeout(10)
        try:
            conn.sendall(b"hi\n")
            while conn.recv(100):
                pass
        except OSError:
            pass
        ended.set()
        conn.close()

    t = threading.Thread(target=backend)
    t.start()
    try:
        proxy, port = proxy_to(tmp_path, start_proxy, f"127.0.0.1:{srv.getsockname()[1]}")
        s = connect(port, timeout=5)
        assert read_line(s) == b"hi"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        assert ended.wait(5), "backend still open after the client reset"
    finally:
        srv.close()
