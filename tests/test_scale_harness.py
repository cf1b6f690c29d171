"""The bench's scale phase machinery (`make bench` runs it with 100,000 connections; here a
few hundred, through a real flyproxy on loopback): that it counts what is held, and that
it notices connections that are lost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import bench  # noqa: E402
import hold  # noqa: E402

from helpers import free_ports, write_config  # noqa: E402
from netns import NetNS  # noqa: E402

N = 300


def test_processes_for_keeps_every_process_under_the_fd_limit():
    assert hold.processes_for(200_000, limit=1_048_576) == 1
    # a container's 20,000: 200,000 fds (+10 % for an uneven spread) over 19,000 each
    assert hold.processes_for(200_000, limit=20_000) == 12
    assert hold.processes_for(10, limit=20_000) == 1


def test_held_connections_are_counted_and_lost_ones_noticed(tmp_path, start_proxy):
    front, backend_port = free_ports(2)
    backends = hold.backends(n=4, port=backend_port)
    echo = hold.EchoBackend(backends, processes=2)
    config = write_config(tmp_path / "config.json",
                          {"hold": ([front], [f"{h}:{p}" for h, p in backends])})
    proxy = start_proxy(config)
    clients = hold.Clients(("127.0.0.1", front), processes=2)
    try:
        opened = clients.call("open", N, timeout_s=60)
        assert opened == {"opened": N, "errors": {}}
        assert clients.call("echo", timeout_s=90) == {"echoed": N, "dead": 0, "silent": 0}
        proxy.stop()  # every connection through it ends
        lost = clients.call("echo", timeout_s=90)
        assert lost["echoed"] == 0 and lost["dead"] + lost["silent"] == N
        refused = clients.call("open", 10, timeout_s=60)
        assert refused["opened"] == 0 and refused["errors"] == {"ECONNREFUSED": 10}
    finally:
        clients.stop()
        echo.stop()


@pytest.mark.root
def test_the_upgrade_step_keeps_what_is_held_and_waits_for_the_old_workers(tmp_path,
                                                                          monkeypatch):
    """The bench's upgrade with all open, small: flyproxy (2 workers, per-port) run from a
    copy of the package as the bench runs it, 300 held, the copy's version bumped and
    `flyproxy reload`; in a namespace of its own with tcp_migrate_req=1, as the bench's."""
    monkeypatch.setattr(bench, "WORK", tmp_path, raising=False)
    ns = NetNS("flyproxy-bup")
    ns.exec(["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"], check=True)
    echo = proxy = clients = None
    try:
        with ns.entered():  # every process started here lives in the namespace
            echo = hold.EchoBackend(hold.backends(n=2), processes=1)
            proxy = bench.FlyProxy(20000, workers="2")
            proxy.hold_targets = [f"{h}:{p}" for h, p in hold.backends(n=2)]
            proxy.code_root, proxy.grace = tmp_path / "code", 5
            proxy.start()
            proxy.ready()
            before = proxy.status()
            clients = hold.Clients(("127.0.0.1", proxy.front["idle"]), processes=1)
            assert clients.call("open", N, timeout_s=60) == {"opened": N, "errors": {}}
            upgraded = bench.upgrade_with_all_open(proxy, clients, N)
            after = proxy.status()
            assert clients.call("open", 10, timeout_s=60) == {"opened": 10, "errors": {}}
    finally:
        for thing in (clients, proxy, echo):
            if thing is not None:
                thing.stop()
        ns.delete()
    assert upgraded["held_at_upgrade"] == upgraded["outlived_upgrade"] == N
    assert upgraded["during_upgrade"]["errors"] == {}
    assert upgraded["during_upgrade"]["ok"] == upgraded["during_upgrade"]["tried"] > 0
    assert after["version"] == before["version"] + "+bench1"  # the copy ran, upgraded
    old_gen = before["generations"][-1]["generation"]
    assert [g["generation"] for g in after["generations"]] == [old_gen + 1]  # the old gone
    assert set(after["generations"][0]["pids"]).isdisjoint(before["generations"][-1]["pids"])


def test_the_scale_report_has_a_column_per_proxy():
    figures = {"connections": 100_000, "opened": 100_000, "open_errors": {}, "held": 100_000,
               "open_per_s": 7000.0, "cpu_us_per_conn": 140.0, "rss_kib_per_conn": 1.5,
               "kernel_kib_per_conn": 15.0, "reload_s": 0.3, "failed_on_reload": 0,
               "stop_s": 6.0, "start_s": 1.0, "outlived_restart": 0,
               "during_restart": {"tried": 500, "ok": 480, "errors": {"ECONNREFUSED": 20}},
               "reopened": 99_990,
               "reopen_errors": {"timed out": 10}, "reopen_per_s": 7000.0,
               "upgrade_s": 4.25, "held_at_upgrade": 99_990, "outlived_upgrade": 99_990,
               "during_upgrade": {"tried": 900, "ok": 900, "errors": {}}, "old_gone_s": 3.5}
    old = {k: v for k, v in figures.items()  # results from before the upgrade rows
           if k not in ("upgrade_s", "held_at_upgrade", "outlived_upgrade", "during_upgrade",
                        "old_gone_s")}
    text = "\n".join(bench.hold_report({"flyproxy": figures,
                                        "HAProxy (2 threads)": {**figures, "rss_kib_per_conn": 3.0},
                                        "older": old}))
    assert "| | flyproxy | HAProxy (2 threads) | older |" in text
    assert "| upgrade with all open (s) | 4.2 | 4.2 | - |" in text
    assert ("| held connections that outlived the upgrade | 99,990 of 99,990 | "
            "99,990 of 99,990 | - |") in text
    assert "| new connections during the upgrade (failed) | 900 (none) | 900 (none) | - |" in text
    assert "| old processes gone once the held connections closed (s) | 3.5 |" in text
    assert "tcp_migrate_req=1" in text and "ran on its own" not in text
    run = {"date": "today", "kernel": "k", "duration_s": 600}
    assert "This phase ran on its own on today, kernel k, in 600 s." in "\n".join(
        bench.hold_report({"flyproxy": figures}, run))
    assert "| held at once (of connections opened) | 100,000 of 100,000 |" in text
    assert "| all reopened after the restart (failed) | 99,990 (10 timed out) |" in text
    assert "| new connections during the restart (failed) | 500 (20 ECONNREFUSED) |" in text
    assert "flyproxy 0.50x" in text
    assert bench.hold_report({}) == []
