"""Single-listener mode: sockets handed in (``--fd``, systemd's LISTEN_FDS), routed by local port."""

from __future__ import annotations

import selectors
import time
import shutil
import signal
import socket
import subprocess

import pytest

from helpers import (PYTHON, REPO, WAIT_S, NotifySocket, connect, free_ports, greet, read_line,
                     write_config, run_cli)


def listener(port: int = 0) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    return s


def test_handed_in_socket_routes_by_local_port(tmp_path, start_proxy, make_backend):
    a = make_backend("a")
    sock_a, sock_other = listener(), listener()
    port_a, port_other = sock_a.getsockname()[1], sock_other.getsockname()[1]
    cfg = write_config(tmp_path / "config.json", {"a": ([port_a], [a.address])})
    proxy = start_proxy(cfg, "--fd", str(sock_a.fileno()), "--fd", str(sock_other.fileno()),
                        pass_fds=(sock_a.fileno(), sock_other.fileno()), host=None)
    sock_a.close()
    sock_other.close()
    assert greet(port_a) == "a"
    # A connection on a port no app has: closed at once, and logged.
    with connect(port_other, timeout=5) as s:
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
    assert f"to port {port_other}: no app has this port; closed" in proxy.output()

    # Reload in handed-in mode: the listener stays, routing follows the config.
    b = make_backend("b")
    write_config(cfg, {"a": ([port_a], [a.address]), "b": ([port_other], [b.address])})
    proxy.reload()
    assert greet(port_other) == "b"


def test_handed_in_fd_must_be_a_listening_tcp_socket(tmp_path):
    cfg = write_config(tmp_path / "config.json", {"a": ([1], ["127.0.0.1:1"])})
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unbound = socket.socket()
    for sock, problem in ((udp, "is not a TCP (stream) socket"), (unbound, "is not listening")):
        result = run_cli("serve", "-c", str(cfg), "--fd", str(sock.fileno()),
                         pass_fds=(sock.fileno(),))
        assert result.returncode == 1
        assert f"fd {sock.fileno()} {problem}" in result.stderr
    udp.close()
    unbound.close()


def wait_for_line(stream, text: str, timeout: float = WAIT_S) -> str:
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while sel.select(max(0.0, deadline - time.monotonic())):
            line = stream.readline()
            if text in line:
                return line
            if not line:
                break
    raise TimeoutError(f"no line with {text!r} within {timeout}s")


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="needs systemd package")
def test_socket_activation_with_systemd_socket_activate(tmp_path, make_backend):
    """The same LISTEN_FDS protocol a .socket unit uses, without PID 1 being systemd."""
    a = make_backend("a")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [a.address])})
    notify = NotifySocket(tmp_path)
    log = open(tmp_path / "proxy.log", "w")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
         "-E", f"NOTIFY_SOCKET={notify.path}", "-E", f"PYTHONPATH={REPO}",
         PYTHON, "-m", "appliance", "serve", "-c", str(cfg)],
        cwd=REPO, stdout=log, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(proc.stderr, "Listening on")
        # systemd-socket-activate starts the proxy on the first connection.
        with connect(port) as s:
            ready = notify.wait_for("READY", "1")
            assert read_line(s) == b"a"
        assert greet(port) == "a"
        assert ready["MAINPID"] == str(proc.pid)  # systemd-socket-activate execs the proxy
        assert ready["STATUS"].startswith("generation 1: 1 app, 1 port")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT_S)
        log.close()
        notify.close()
