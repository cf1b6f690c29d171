"""Faults production brings, each injected for real: idle clients, limits, dead targets,
running out of file descriptors, thousands of connections, reloads under traffic."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from helpers import (PYTHON, REPO, closed_by_peer, connect, dead_port, free_ports, greet,
                     NotifySocket, pipes_of, read_line, recv_all, refused, sample, scrape, wait_until,
                     write_config)
from load import LoadGenerator


def test_idle_connections_are_closed_and_busy_ones_are_not(tmp_path, start_proxy, make_backend):
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    proxy = start_proxy(cfg, "--idle-timeout", "1", "--conn-log-level", "info")
    idle, busy = connect(port, timeout=10), connect(port, timeout=10)
    assert read_line(idle) == b"b" and read_line(busy) == b"b"
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # keep one connection talking
        busy.sendall(b"tick\n")
        assert read_line(busy) == b"tick"
        time.sleep(0.2)  # the client's pace, not a synchronisation
    assert closed_by_peer(idle)  # closed within ~1.25 s of silence; recv waits at most 10 s
    assert time.monotonic() - started < 5
    busy.sendall(b"still\n")
    assert read_line(busy) == b"still"
    busy.close()
    assert "end=idle" in proxy.output()


def test_app_connection_limit(tmp_path, start_proxy, make_backend):
    backend = make_backend("b")
    port, other = free_ports(2)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"Apps": [
        {"Name": "limited", "Ports": [port], "Targets": [backend.address], "MaxConnections": 2},
        {"Name": "free", "Ports": [other], "Targets": [backend.address]}]}))
    proxy = start_proxy(cfg)
    first, second = connect(port), connect(port)
    assert read_line(first) == b"b" and read_line(second) == b"b"
    assert refused(port)  # at the limit: closed at once (a reset)
    assert greet(other) == "b"  # other apps are not limited
    # End the first connection fully: the client sees EOF only after the proxy has closed
    # both sides; the reload that follows is a round trip through the proxy's loop.
    first.shutdown(socket.SHUT_WR)
    assert recv_all(first) == b"bye\n"
    first.close()
    proxy.reload()
    assert greet(port) == "b"
    second.close()
    assert "closed: at its limit of 2 open connections" in proxy.output()


def test_failed_target_is_tried_last_for_a_while(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, metrics_port = free_ports(2)
    dead = f"127.0.0.1:{dead_port()}"
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [dead, live.address])})
    start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}", "--eject", "60")
    for _ in range(30):
        assert greet(port) == "live"
    text = scrape(metrics_port)
    # Without ejection about half of 30 connections would try the dead target first.
    assert sample(text, "flyproxy_connect_failures_total", app="a", target=dead, reason="refused") == 1


def test_running_out_of_file_descriptors_neither_crashes_nor_spins(tmp_path, start_proxy, make_backend):
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})

    def low_fd_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    proxy = start_proxy(cfg, preexec_fn=low_fd_limit)
    cpu_before = proxy.cpu_seconds()
    clients = []
    for _ in range(60):  # more clients than the proxy has fds for
        s = socket.socket()
        s.settimeout(10)
        s.connect_ex(("127.0.0.1", port))
        clients.append(s)
    time.sleep(2)  # the fault persists for a while: measure what the proxy does meanwhile
    assert proxy.proc.poll() is None, proxy.output()
    assert proxy.cpu_seconds() - cpu_before < 1.0, "the proxy spins while out of fds"
    for s in clients:
        s.close()
    # Recovered: new connections work again (accepting resumes after 1 s).
    wait_until(lambda: greet_or_none(port) == "b", "new connections answered again")
    log = proxy.output()
    assert "too many open files" in log.lower(), log  # the fault really happened ...
    # ... logged, not flooded: once per 10 s for accept() and for the backend socket()
    assert 1 <= log.count("out of system resources") <= 2, log


def greet_or_none(port: int):
    try:
        return greet(port)
    except OSError:
        return None


def test_five_thousand_concurrent_connections_all_echo(tmp_path, start_proxy):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # inherited by what we start; root may raise the hard limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 12000),) * 2)
    except (ValueError, OSError):  # an allowed skip in CI (conftest.py ALLOWED_SKIPS)
        pytest.skip(f"needs an open-file limit of 12000 (hard limit {hard}, not raisable here)")
    port, echo_port = free_ports(2)
    echo = subprocess.Popen([PYTHON, "-m", "appliance", "echo", "--listen", f"127.0.0.1:{echo_port}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conns = []
    try:
        cfg = write_config(tmp_path / "config.json", {"a": ([port], [f"127.0.0.1:{echo_port}"])})
        start_proxy(cfg)
        wait_until(lambda: greet_or_none_echo(port) is not None, "the echo answers")
        for _ in range(5000):
            conns.append(connect(port, timeout=30))
        for i, s in enumerate(conns):
            s.sendall(b"%d\n" % i)
        for i, s in enumerate(conns):
            assert read_line(s) == b"%d" % i
    finally:
        for s in conns:
            s.close()
        echo.terminate()
        echo.wait(10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def greet_or_none_echo(port: int):
    try:
        with connect(port, timeout=2) as s:
            s.sendall(b"ping\n")
            return read_line(s) or None
    except OSError:
        return None


def test_reload_under_a_steady_stream_of_connections(tmp_path, start_proxy, make_backend):
    a, b = make_backend("a"), make_backend("b")
    p1, p2, extra = free_ports(3)
    cfg = write_config(tmp_path / "config.json", {"app": ([p1, p2], [a.address])})
    proxy = start_proxy(cfg)
    load = LoadGenerator([p1, p2], max_seconds=60)
    load.start()
    assert load.first_done.wait(10)
    for i in range(6):
        ports = [p1, p2, extra] if i % 2 == 0 else [p1, p2]
        write_config(cfg, {"app": (ports, [(a, b)[i % 2].address])})
        ready = proxy.reload()
        assert f"generation {i + 2}" in ready["STATUS"]
    ok, failures = load.stop()
    assert failures == []
    assert ok > 0


def test_over_the_pipe_quota_bulk_connections_stay_on_recv_and_send(tmp_path, make_backend):
    """An unprivileged proxy past fs.pipe-user-pages-soft gets tiny pipes; it must not
    splice through them (an event per few KiB) nor fail: it keeps to recv and send."""
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv")
    backend = make_backend("echo")
    port, = free_ports(1)
    copy = Path(tempfile.mkdtemp(prefix="flyproxy-pipes-", dir="/tmp"))  # nobody can read it
    shutil.copytree(REPO / "appliance", copy / "appliance")
    write_config(copy / "config.json", {"a": ([port], [backend.address])})
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    notify = NotifySocket(copy)
    os.chmod(notify.path, 0o666)  # nobody may tell us it is ready
    soft = Path("/proc/sys/fs/pipe-user-pages-soft")
    old = soft.read_text()
    soft.write_text("1")  # every pipe of an unprivileged user is over the quota
    proxy = subprocess.Popen(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3",
         "-m", "appliance", "serve", "-c", "config.json", "--host", "127.0.0.1",
         "--splice-after", "1"], cwd=copy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy),
                        "NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY", "1")
        # Counted before connecting: each direction past --splice-after makes a pipe, finds
        # it too small and closes it at once, so a count in the middle could catch one.
        before = pipes_of(proxy.pid)  # the event loop has pipes of its own
        with connect(port) as s:
            assert read_line(s) == b"echo"
            payload = os.urandom(4 << 20)
            s.sendall(payload[:1 << 20])  # past --splice-after: it would switch now
            got = s.recv(1 << 20, socket.MSG_WAITALL)
            assert pipes_of(proxy.pid) == before, "spliced through a pipe over the quota"
            sender = threading.Thread(target=lambda: (s.sendall(payload[1 << 20:]),
                                                      s.shutdown(socket.SHUT_WR)))
            sender.start()
            got += recv_all(s)
            sender.join(10)
        assert got == payload + b"bye\n"
    finally:
        soft.write_text(old)
        proxy.kill()
        _, err = proxy.communicate(timeout=10)
        notify.close()
        shutil.rmtree(copy)
    assert "Traceback" not in err, err


def keepalive_timers(port: int) -> dict[str, str]:
    """The kernel's own view (``ss -o``) of TCP connections on loopback port ``port``:
    local address -> the timer it runs (``keepalive,...`` once SO_KEEPALIVE is on)."""
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} or "
                          f"dport = :{port} )"], capture_output=True, text=True, timeout=10)
    timers = {}
    for line in out.stdout.splitlines():
        fields = line.split()
        timers[f"{fields[2]}>{fields[3]}"] = next(
            (f for f in fields[4:] if f.startswith("timer:(")), "")
    return timers


def test_both_sides_of_a_connection_get_tcp_keepalive(tmp_path, start_proxy, make_backend):
    """A peer that vanishes without FIN or RST is found by keepalive probes, not only by
    the idle timeout: the client's socket (from the listener) and the backend's (once the
    connection has lived a sweep) run the kernel's keepalive timer with our settings."""
    backend = make_backend("one")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    start_proxy(cfg, "--keepalive-idle", "45", "--keepalive-interval", "5",
                "--keepalive-probes", "3", "--idle-timeout", "8")  # a sweep every 2 s
    with connect(port) as held:
        assert read_line(held) == b"one"
        client_side = f"127.0.0.1:{port}>127.0.0.1:{held.getsockname()[1]}"

        def backend_side():
            timers = keepalive_timers(backend.port)
            return next((t for side, t in timers.items()
                         if side.endswith(f">127.0.0.1:{backend.port}")), None)

        timer = keepalive_timers(port)[client_side]
        assert timer.startswith("timer:(keepalive,"), timer
        assert 40 <= int(timer.split(",")[1].split("sec")[0].split("min")[0]) <= 45, timer
        timer = wait_until(lambda: (backend_side() or "").startswith("timer:(keepalive,")
                           and backend_side(), "the backend socket's keepalive")
        held.sendall(b"x\n")
        assert read_line(held) == b"x"  # traffic still flows


def test_keepalive_off_sets_no_timer(tmp_path, start_proxy, make_backend):
    backend = make_backend("one")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    start_proxy(cfg, "--keepalive-idle", "0")
    with connect(port) as held:
        assert read_line(held) == b"one"
        assert not any(t.startswith("timer:(keepalive") for t in keepalive_timers(port).values())
