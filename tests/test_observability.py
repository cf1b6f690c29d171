"""Metrics, the per-connection log line, rate-limited errors, target health in status."""

from __future__ import annotations

import json
import os
import socket

import pytest

from helpers import (REPO, closed_by_peer, connect, dead_port, free_ports, greet, recv_all,
                     run_cli, sample, scrape, write_config)


def test_metrics_count_connections_bytes_failures_and_reloads(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, down_port, metrics_port = free_ports(3)
    dead = f"127.0.0.1:{dead_port()}"
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address]),
                                                  "down": ([down_port], [dead])})
    proxy = start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}")
    with connect(port) as s:
        s.sendall(b"12345\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"live\n12345\nbye\n"  # closed by the proxy: it is accounted
    assert greet(down_port) == ""  # all targets down: closed
    proxy.reload()  # a round trip through the proxy's event loop, after the closes
    text = scrape(metrics_port)
    assert sample(text, "flyproxy_connections_accepted_total", app="a") == 1
    assert sample(text, "flyproxy_connect_attempts_total", app="a", target=live.address) == 1
    assert sample(text, "flyproxy_connect_seconds_count", app="a", target=live.address) == 1
    assert sample(text, "flyproxy_connect_seconds_bucket", app="a", target=live.address, le="+Inf") == 1
    assert sample(text, "flyproxy_connect_seconds_bucket", app="a", target=live.address, le="5.0") == 1
    assert sample(text, "flyproxy_connect_failures_total", app="down", target=dead, reason="refused") == 1
    assert sample(text, "flyproxy_all_targets_down_total", app="down") == 1
    assert sample(text, "flyproxy_reloads_total", result="ok") == 1
    assert sample(text, "flyproxy_config_generation") == 2
    assert sample(text, "flyproxy_bytes_total", app="a", target=live.address, direction="in") == 6
    assert sample(text, "flyproxy_bytes_total", app="a", target=live.address, direction="out") == 15
    assert sample(text, "flyproxy_connections_active", app="a") == 0
    assert sample(text, "flyproxy_connections_closed_total", app="a", end="closed") == 1


def test_repeated_errors_are_rate_limited(tmp_path, start_proxy):
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"down": ([port], [f"127.0.0.1:{dead_port()}"])})
    proxy = start_proxy(cfg)
    for _ in range(20):
        assert greet(port) == ""
    proxy.reload()
    assert proxy.output().count("the only target failed") == 1


def test_status_shows_target_health(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    dead = f"127.0.0.1:{dead_port()}"
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [dead, live.address])})
    control = str(tmp_path / "control.sock")
    start_proxy(cfg, "--control", control)
    for _ in range(30):  # the odds the dead one is never picked first: (1/2)^30
        assert greet(port) == "live"
    status = json.loads(run_cli("status", "--control", control, "--json").stdout)
    health = {t["target"]: t["health"] for t in status["apps"][0]["targets"]}
    assert health[live.address] == "ok"
    assert health[dead].startswith("ejected: refused")
    table = run_cli("status", "--control", control).stdout
    assert "ejected (connect refused, " in table


def test_idle_connections_to_the_metrics_port_cannot_starve_the_data_plane(tmp_path, start_proxy,
                                                                           make_backend):
    """A local user holds hundreds of idle connections to /metrics (with prometheus_client's
    threaded server each took a thread and an fd, forever, and at nofile 1024 the proxy
    could no longer accept): at most MAX_CLIENTS are kept, each for READ_DEADLINE_S; the
    rest are closed at once; the data plane serves throughout; scrapes work again after."""
    from appliance import metrics_http
    import resource

    backend = make_backend("b")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    proxy = start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}",
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
    idle = []
    try:
        for _ in range(600):  # more than the proxy has fds for
            s = socket.socket()
            s.settimeout(10)
            s.connect(("127.0.0.1", metrics_port))
            idle.append(s)
        assert [greet(port) for _ in range(10)] == ["b"] * 10
        open_fds = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        assert open_fds < 64, f"{open_fds} fds open in the proxy"
        # every idle connection is closed by the proxy: at once, or at the read deadline
        for s in idle:
            assert closed_by_peer(s)
    finally:
        for s in idle:
            s.close()
    assert "flyproxy_connections_accepted" in scrape(metrics_port)
    assert metrics_http.MAX_CLIENTS == 8  # (what the docstring promises)


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
], ids=["post", "not-found", "huge-header"])
def test_the_metrics_endpoint_answers_only_what_it_serves(tmp_path, start_proxy, make_backend,
                                                          request_bytes, status):
    backend = make_backend("b")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    start_proxy(cfg, "--metrics", f"127.0.0.1:{metrics_port}")
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as s:
        try:
            s.sendall(request_bytes)
            answer = recv_all(s)
        except ConnectionResetError:
            answer = b""
    assert answer.split(b" ", 2)[1:2] == ([status] if status else [])
    assert "flyproxy_connections_accepted" in scrape(metrics_port)


def test_the_proxy_reports_its_file_descriptors_and_their_limit(tmp_path, start_proxy,
                                                                make_backend):
    import resource

    backend = make_backend("b")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "control.sock")
    proxy = start_proxy(cfg, "--control", control, "--metrics", f"127.0.0.1:{metrics_port}",
                        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (777, 777)))
    with connect(port) as held:
        assert held.recv(2) == b"b\n"
        status = json.loads(run_cli("status", "--control", control, "--json").stdout)
        assert status["fds"]["limit"] == 777
        # counted while answering: its own control connection and the listing's directory
        # fd are among them
        listed = len(os.listdir(f"/proc/{proxy.pid}/fd"))
        assert listed <= status["fds"]["open"] <= listed + 3
        text = scrape(metrics_port)
        assert sample(text, "flyproxy_max_fds") == 777
        assert sample(text, "flyproxy_open_fds") >= 4  # listener, metrics, control, the two ends
    assert "of 777 fds" in run_cli("status", "--control", control).stdout


def test_the_unit_allows_the_fds_the_docs_say():
    unit = (REPO / "systemd" / "flyproxy.service").read_text()
    assert "LimitNOFILE=1048576" in unit.splitlines()
    assert "1,048,576" in (REPO / "NOTES.md").read_text()
