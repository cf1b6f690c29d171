"""SIGTERM/SIGINT: stop accepting, let open connections finish within the grace period."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from helpers import connect, free_ports, read_line, recv_all, write_config


def serve_one(tmp_path, start_proxy, make_backend, *args):
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    return start_proxy(cfg, *args), port


def test_graceful_shutdown_lets_open_connections_finish(tmp_path, start_proxy, make_backend):
    proxy, port = serve_one(tmp_path, start_proxy, make_backend, "--grace-period", "20")
    held = connect(port)
    assert read_line(held) == b"b"
    proxy.signal(signal.SIGTERM)
    proxy.notify.wait_for("STOPPING", "1")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    held.sendall(b"after sigterm\n")
    assert read_line(held) == b"after sigterm"
    assert proxy.proc.poll() is None  # still draining
    held.shutdown(socket.SHUT_WR)
    assert recv_all(held) == b"bye\n"
    held.close()
    assert proxy.wait() == 0


def test_grace_period_expiry_closes_what_is_left(tmp_path, start_proxy, make_backend):
    proxy, port = serve_one(tmp_path, start_proxy, make_backend, "--grace-period", "1")
    held = connect(port)
    assert read_line(held) == b"b"
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
    assert 0.9 < time.monotonic() - started < 5
    with pytest.raises(ConnectionResetError):  # an abort, not a clean end of stream
        held.recv(10)
    assert "aborted 1 connection still open" in proxy.output()
    assert "end=shutdown" in proxy.output()


def test_second_signal_exits_at_once(tmp_path, start_proxy, make_backend):
    proxy, port = serve_one(tmp_path, start_proxy, make_backend, "--grace-period", "60")
    held = connect(port)
    assert read_line(held) == b"b"
    proxy.signal(signal.SIGINT)
    proxy.notify.wait_for("STOPPING", "1")
    proxy.signal(signal.SIGINT)
    assert proxy.wait(5) == 0
    with pytest.raises(ConnectionResetError):  # an abort, not a clean end of stream
        held.recv(10)


def test_idle_shutdown_is_immediate(tmp_path, start_proxy, make_backend):
    proxy, port = serve_one(tmp_path, start_proxy, make_backend)
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(5) == 0
