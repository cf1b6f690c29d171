"""Per-port mode: each port reaches its app; random-then-retry routes around dead targets."""

from __future__ import annotations

import collections
import time

from helpers import dead_port, free_ports, greet, connect, read_line, write_config


def test_each_port_reaches_its_app(tmp_path, start_proxy, make_backend):
    a, b = make_backend("app-a"), make_backend("app-b")
    pa1, pa2, pb1 = free_ports(3)
    cfg = write_config(tmp_path / "config.json",
                       {"a": ([pa1, pa2], [a.address]), "b": ([pb1], [b.address])})
    start_proxy(cfg)
    assert [greet(p) for p in (pa1, pa2, pb1)] == ["app-a", "app-a", "app-b"]


def test_connections_are_spread_across_targets(tmp_path, start_proxy, make_backend):
    servers = [make_backend(f"t{i}") for i in range(3)]
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [s.address for s in servers])})
    start_proxy(cfg)
    counts = collections.Counter(greet(port) for _ in range(90))
    # Uniform random choice: each of 3 targets expects 30; fewer than 10 has odds below 1e-6.
    assert set(counts) == {"t0", "t1", "t2"}
    assert min(counts.values()) >= 10, counts


def test_dead_and_unresolvable_targets_are_routed_around(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    targets = [f"127.0.0.1:{dead_port()}", "bad.target.for.testing:6003", live.address]
    cfg = write_config(tmp_path / "config.json", {"a": ([port], targets)})
    proxy = start_proxy(cfg)
    # 30 connections: the odds that the live target is never picked first are (2/3)^30.
    assert [greet(port) for _ in range(30)] == ["live"] * 30
    log = proxy.output()
    assert "after 2 attempts" in log or "after 3 attempts" in log


def test_all_targets_down_closes_the_client_promptly(tmp_path, start_proxy):
    port, = free_ports(1)
    targets = [f"127.0.0.1:{dead_port()}", "bad.target.for.testing:6003"]
    cfg = write_config(tmp_path / "config.json", {"a": ([port], targets)})
    proxy = start_proxy(cfg)
    started = time.monotonic()
    with connect(port, timeout=5) as s:
        assert read_line(s) == b""  # closed, not left hanging
    assert time.monotonic() - started < 3
    assert "all 2 targets failed" in proxy.output()


def test_silent_target_times_out_and_the_next_is_tried(tmp_path, start_proxy, make_backend):
    """A target whose accept queue is full drops our SYNs: the per-attempt timeout moves on."""
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        # Fill the accept queue (backlog 0 holds one); further SYNs are dropped.
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
            fillers.append(f)
        live = make_backend("live")
        port, = free_ports(1)
        cfg = write_config(tmp_path / "config.json",
                           {"a": ([port], [f"127.0.0.1:{silent.getsockname()[1]}", live.address])})
        proxy = start_proxy(cfg)  # --connect-timeout 1
        # Each connection tries the silent target first with odds 1/2 (until it has failed
        # once and is tried last): 30 connections miss it with odds 2**-30.
        for _ in range(30):
            assert greet(port) == "live"
            if "timeout" in proxy.output():
                break
        assert "timeout" in proxy.output()
    finally:
        for f in fillers:
            f.close()
        silent.close()


def test_ipv6_target(tmp_path, start_proxy):
    from helpers import TaggedBackend

    class V6(TaggedBackend):
        address_family = __import__("socket").AF_INET6

    backend = V6("v6", host="::1")
    try:
        port, = free_ports(1)
        cfg = write_config(tmp_path / "config.json", {"a": ([port], [f"[::1]:{backend.port}"])})
        start_proxy(cfg)
        assert greet(port) == "v6"
    finally:
        backend.stop()
