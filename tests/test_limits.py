"""Edge protections: each per-app limit at its boundary (N served, N+1 refused), another
client unaffected, counts shared by the workers of a host, bandwidth, DrainTimeout, and
the client table's bound."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from appliance.config import App
from appliance.dataplane import limits
from helpers import (WAIT_S, closed_by_peer, free_ports, read_line, recv_all, sample, scrape,
                     status_of, wait_until)

WORKERS = ("--workers", "2")


def app(name: str, port: int, targets: list[str], **keys) -> dict:
    return {"Name": name, "Ports": [port], "Targets": targets, **keys}


def configure(path, *apps: dict):
    path.write_text(json.dumps({"Apps": list(apps)}))
    return path


def open_from(port: int, source: str = "127.0.0.1") -> socket.socket | None:
    """A connection to the proxy's ``port`` from the loopback address ``source`` (None: reset
    before connect() returned, as a refusal on loopback can be)."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S,
                                     source_address=(source, 0))
    except ConnectionResetError:
        return None
    s.settimeout(WAIT_S)
    return s


def served(s: socket.socket | None, tag: str = "b") -> bool:
    """Did the backend greet us (served), or did the proxy close us at once (refused, with a
    reset)?"""
    if s is None:
        return False
    try:
        line = read_line(s)
    except ConnectionResetError:
        return False
    assert line in (tag.encode(), b""), line
    return line == tag.encode()


def end(s: socket.socket) -> None:
    """Close a served connection fully: EOF both ways (the proxy has let go of it)."""
    s.shutdown(socket.SHUT_WR)
    recv_all(s)
    s.close()


@pytest.fixture
def backend(make_backend):
    return make_backend("b")


def test_max_connections_is_exact_over_workers(tmp_path, start_proxy, backend):
    """5 with 2 workers: split per worker (the old way) it was 2 + 2; host-wide it is 5,
    however the kernel spreads the connections."""
    port, metrics = free_ports(2)
    cfg = configure(tmp_path / "c.json", app("a", port, [backend.address], MaxConnections=5))
    proxy = start_proxy(cfg, *WORKERS, "--metrics", f"127.0.0.1:{metrics}")
    conns = [open_from(port, f"127.0.0.{2 + i % 7}") for i in range(12)]
    verdicts = [served(s) for s in conns]
    assert verdicts.count(True) == 5
    st = status_of(str(tmp_path / "control.sock"))
    assert sum(w["active"] for w in st["workers"]) == 5
    # one ends: exactly one more may open, and no second one
    end(conns[verdicts.index(True)])
    wait_until(lambda: served(s := open_from(port)) and conns.append(s) is None,
               "a new connection served after one ended", timeout=10)
    assert not served(open_from(port))
    text = scrape(metrics)
    assert sample(text, "flyproxy_connections_rejected_total", app="a",
                  reason="max_connections") >= 8
    assert "connection from 127.0.0." in proxy.output() and \
        "closed: at its limit of 5 open connections" in proxy.output()
    for s in conns:
        if s is not None:
            s.close()


def test_connections_per_client(tmp_path, start_proxy, backend):
    port, = free_ports(1)
    cfg = configure(tmp_path / "c.json",
                    app("a", port, [backend.address], MaxConnectionsPerClient=3))
    proxy = start_proxy(cfg, *WORKERS)
    mine = [open_from(port, "127.0.0.2") for _ in range(4)]
    verdicts = [served(s) for s in mine]  # (two workers: accepted in any order)
    assert verdicts.count(True) == 3
    others = [open_from(port, "127.0.0.3") for _ in range(3)]  # another client: its own 3
    assert all(served(s) for s in others)
    end(mine[verdicts.index(True)])  # one of mine ends: one more for me
    wait_until(lambda: served(s := open_from(port, "127.0.0.2")) and mine.append(s) is None,
               "a new connection from the client once one ended", timeout=10)
    assert "from 127.0.0.2:" in proxy.output() and "client at its limit of 3" in proxy.output()
    for s in mine + others:
        if s is not None:
            s.close()


def test_connection_rate_per_client(tmp_path, start_proxy, backend):
    port, = free_ports(1)
    cfg = configure(tmp_path / "c.json",
                    app("a", port, [backend.address], MaxConnectionRatePerClient=3))
    proxy = start_proxy(cfg, *WORKERS)
    started = time.monotonic()
    verdicts = []
    for _ in range(4):  # a burst of about the rate: 3, then none until a token comes back
        s = open_from(port, "127.0.0.2")
        verdicts.append(served(s))
        if s is not None:
            s.close()
    if time.monotonic() - started < 0.3:  # (a token comes back every 1/3 s)
        assert verdicts == [True, True, True, False]
    assert served(open_from(port, "127.0.0.3"))  # another client is not affected
    wait_until(lambda: served(open_from(port, "127.0.0.2")), "the client served again",
               timeout=10)
    assert "client over its limit of 3 new connections/s" in proxy.output()


def test_connection_rate_for_the_app(tmp_path, start_proxy, backend, make_backend):
    port, other = free_ports(2)
    cfg = configure(tmp_path / "c.json", app("a", port, [backend.address], MaxConnectionRate=4),
                    app("free", other, [make_backend("f").address]))
    proxy = start_proxy(cfg, *WORKERS)
    started = time.monotonic()
    verdicts = []
    for i in range(5):  # from five clients: the app's bucket is theirs together
        s = open_from(port, f"127.0.0.{2 + i}")
        verdicts.append(served(s))
        if s is not None:
            s.close()
    if time.monotonic() - started < 0.25:
        assert verdicts == [True, True, True, True, False]
    assert served(open_from(other), "f")  # another app is not affected
    assert "over its limit of 4 new connections/s" in proxy.output()


def pump_server(payload: int):
    """A backend that, per connection, either sends ``payload`` bytes and closes (the
    client sent b'down'), or reads to EOF and answers how many bytes it got and over how
    many seconds from the first (b'up')."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(WAIT_S)

    def handle(conn):
        with conn:
            conn.settimeout(30)
            mode = conn.recv(4)
            if mode == b"down":
                conn.sendall(b"x" * payload)
                return
            got, first = 0, None
            while data := conn.recv(65536):
                first = first or time.monotonic()
                got += len(data)
            conn.sendall(f"{got} {time.monotonic() - first:.3f}".encode())

    def run():
        for _ in range(2):
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return srv


def test_bandwidth_per_connection_each_way(tmp_path, start_proxy):
    """300 KB at 100 KB/s takes 3 s each way (within 20 %); the proxy buffers at most a
    read meanwhile (the sender is held back by TCP)."""
    rate, size = 100_000, 300_000
    port, = free_ports(1)
    srv = pump_server(size)
    target = f"127.0.0.1:{srv.getsockname()[1]}"
    cfg = configure(tmp_path / "c.json", app("a", port, [target], BytesPerSecond=rate))
    start_proxy(cfg)
    with open_from(port) as s:  # download: time the client's receipt
        s.settimeout(30)
        s.sendall(b"down")
        first = time.monotonic()
        data = recv_all(s)
        down_s = time.monotonic() - first
    assert len(data) == size
    with open_from(port) as s:  # upload: the backend times its receipt
        s.settimeout(30)
        s.sendall(b"up  " + b"y" * size)
        s.shutdown(socket.SHUT_WR)
        got, up_s = recv_all(s).split()
    srv.close()
    assert int(got) == size
    expected = size / rate
    assert 0.8 * expected <= down_s <= 1.2 * expected, down_s
    assert 0.8 * expected <= float(up_s) <= 1.2 * expected, up_s


def test_drain_timeout_after_a_reload_removes_a_target(tmp_path, start_proxy, make_backend):
    gone, kept = make_backend("gone"), make_backend("kept")
    port, = free_ports(1)
    cfg = configure(tmp_path / "c.json",
                    app("a", port, [gone.address, kept.address], DrainTimeout=1))
    proxy = start_proxy(cfg, *WORKERS)
    held: dict[str, list[socket.socket]] = {"gone": [], "kept": []}
    for _ in range(60):  # random picks: until each target holds two
        s = open_from(port)
        held[read_line(s).decode()].append(s)
        if all(len(v) >= 2 for v in held.values()):
            break
    assert all(len(v) >= 2 for v in held.values()), {k: len(v) for k, v in held.items()}
    configure(cfg, app("a", port, [kept.address], DrainTimeout=1))
    reloaded = time.monotonic()
    proxy.reload()
    for s in held["gone"]:
        assert closed_by_peer(s)  # (bounded: the socket's timeout)
    assert time.monotonic() - reloaded >= 0.9  # not at once: after the DrainTimeout
    for s in held["kept"]:  # the kept target's connections are untouched
        s.sendall(b"still\n")
        assert read_line(s) == b"still"
    out = proxy.output()
    assert out.count("closing at its DrainTimeout") == len(held["gone"])
    assert "end=drain-timeout" in out
    for s in held["kept"]:
        s.close()


def test_drain_timeout_for_a_target_the_checks_take_down(tmp_path, start_proxy, make_backend):
    """A target that stops accepting (its open connections still work) is taken down by the
    health checks; its connections are closed DrainTimeout later."""
    sick, well = make_backend("sick"), make_backend("well")
    port, = free_ports(1)
    check = {"Interval": 0.2, "Timeout": 0.5, "Fall": 1, "Rise": 1}
    cfg = configure(tmp_path / "c.json", app("a", port, [sick.address, well.address],
                                             DrainTimeout=0.5, HealthCheck=check))
    proxy = start_proxy(cfg)
    held: dict[str, list[socket.socket]] = {"sick": [], "well": []}
    for _ in range(60):
        s = open_from(port)
        held[read_line(s).decode()].append(s)
        if all(held.values()):
            break
    assert all(held.values())
    sick.shutdown()  # stops accepting: the checks fail; established connections go on
    sick.server_close()
    for s in held["sick"]:
        assert closed_by_peer(s)
    for s in held["well"]:
        s.sendall(b"ok\n")
        assert read_line(s) == b"ok"
    assert "closing at its DrainTimeout" in proxy.output()


def test_the_client_table_is_bounded():
    """A scan from 100,000 addresses fills no more than the table; clients with open
    connections stay counted; when a window is all open connections, a new client is
    admitted untracked (on the app-wide limits alone)."""
    a = App("a", (1,), (), max_per_client=1, rate_per_client=1000.0)
    table = limits.Table(capacity=4096)
    now = time.monotonic()
    holders = []
    for i in range(10):  # ten clients keep a connection open
        reason, held = table.admit(a, f"10.0.0.{i}", now)
        assert reason is None
        holders.append(held)
    for i in range(100_000):  # a scan: each address once, each connection closed at once
        reason, held = table.admit(a, f"2001:db8::{i >> 16:x}:{i & 0xffff:x}", now)
        assert reason is None
        table.release(held)
    assert table.entries() <= 4096
    assert len(table.map) == limits._size(1, 4096)  # fixed size: allocated once
    for i in range(10):  # the ten are still counted: a second connection is refused
        assert table.admit(a, f"10.0.0.{i}", now)[0] == "client_connections"
    small = limits.Table(capacity=limits.PROBE)  # one window: fill it with open connections
    for i in range(limits.PROBE):
        assert small.admit(a, f"10.1.0.{i}", now)[0] is None
    assert small.admit(a, "10.2.0.1", now)[0] is None and small.untracked == 1


def test_shared_table_counts_over_processes_and_a_dead_workers_column_is_cleared():
    """Two views on one memfd (as two workers have): one count; clear() forgets a column."""
    fd = limits.create(columns=4)
    one, two = limits.Table(fd, 0), limits.Table(fd, 1)
    a = App("a", (1,), (), max_connections=2)
    now = time.monotonic()
    assert one.admit(a, "::1", now)[0] is None
    assert two.admit(a, "::1", now)[0] is None
    assert two.admit(a, "::1", now)[0] == "max_connections"
    one.clear(1)  # worker 1 died, and its connection with it
    assert one.admit(a, "::1", now)[0] is None
    with pytest.raises(limits.LimitsError, match="column 4 is not in the table's 0..3"):
        limits.Table(fd, 4)


def test_a_flooded_app_sheds_before_its_backend_and_another_app_is_served(
        tmp_path, start_proxy, make_backend):
    """A flood of connections to app A from 500 addresses: A's backend sees no more than
    its MaxConnectionRate lets through (the rest are reset before any backend connect),
    and app B, on the same workers, serves every one of its connections meanwhile."""
    a_backend, b_backend = make_backend("a"), make_backend("b")
    port_a, port_b = free_ports(2)
    cfg = configure(tmp_path / "c.json",
                    app("a", port_a, [a_backend.address], MaxConnectionRate=50),
                    app("b", port_b, [b_backend.address]))
    start_proxy(cfg, *WORKERS)
    stop = threading.Event()
    flood = {"tried": 0}

    def flooder():
        for i in range(3000):  # bounded in count, and by the test's end
            if stop.is_set():
                break
            try:
                s = socket.socket()
                s.bind((f"127.1.{i % 500 // 250}.{i % 250 + 1}", 0))
                s.settimeout(2)
                s.connect(("127.0.0.1", port_a))
                s.close()
            except OSError:
                pass
            flood["tried"] += 1

    threads = [threading.Thread(target=flooder, daemon=True) for _ in range(2)]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        b_served = sum(served(open_from(port_b)) for _ in range(100))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert b_served == 100
    allowed = 50 * (time.monotonic() - started) + 50  # the rate's worth, and its burst
    assert flood["tried"] > allowed  # (a flood indeed: more than A lets through)
    assert 0 < a_backend.connections <= allowed, (a_backend.connections, allowed)


def test_over_the_app_rate_its_port_stops_accepting_and_the_backlog_waits(
        tmp_path, start_proxy, backend):
    """Per-port mode, as HAProxy's rate-limit sessions: the connection that finds the app's
    bucket empty is reset, then the app's port accepts nothing until a token is due; the
    connections meanwhile wait in the kernel's backlog and are served then, not reset."""
    port, = free_ports(1)
    cfg = configure(tmp_path / "c.json", app("a", port, [backend.address], MaxConnectionRate=2))
    proxy = start_proxy(cfg)
    first = [open_from(port, f"127.0.0.{2 + i}") for i in range(2)]
    assert all(served(s) for s in first)  # the burst
    assert not served(open_from(port, "127.0.0.4"))  # the bucket is empty: reset
    waiting = open_from(port, "127.0.0.5")  # queued while the port pauses
    assert waiting is not None and served(waiting)  # served once a token is due (~0.5 s)
    assert "over its limit of 2 new connections/s" in proxy.output()
    for s in first + [waiting]:
        s.close()
