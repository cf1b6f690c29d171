"""Active health checks ("HealthCheck"): one set per host, shared by every worker; a target
that is down is not tried while another is up; status and metrics show the state."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest

from appliance.config import HealthCheck, Target, loads
from appliance.dataplane.checks import Checker
from helpers import TaggedBackend, dead_port, free_ports, greet, run_cli, wait_until

FAST = {"Interval": 0.3, "Timeout": 0.5, "Rise": 2, "Fall": 2}


def test_fall_and_rise_count_consecutive_checks():
    async def main():
        changes = []
        checker = Checker(lambda t: [], changes.append)
        port = dead_port()
        config = loads(json.dumps({"Apps": [{"Name": "a", "Ports": [1], "Targets": [
            f"127.0.0.1:{port}"], "HealthCheck": {"Interval": 60, "Rise": 2, "Fall": 3}}]}))
        checker.apply(config)
        checker.close()  # checks are driven by hand below
        (check,) = checker.checks.values()
        target = Target("127.0.0.1", port)
        ok, why = await checker.probe(target, 1.0)
        assert (ok, why) == (False, "refused")
        for result in (False, False, True, False, False):  # never 3 failures in a row
            checker.record(check, result, "refused")
        assert check.up
        checker.record(check, False, "refused")
        assert not check.up and checker.down() == {"a": frozenset({target})}
        checker.record(check, True, "")
        assert not check.up  # one success is not Rise 2
        checker.record(check, True, "")
        assert check.up and checker.down() == {}
        # on_change: at the fall, at the rise (each the one change)
        assert changes == [[("a", target, False)], [("a", target, True)]]
        with socket.create_server(("127.0.0.1", 0)) as srv:
            assert await checker.probe(Target("127.0.0.1", srv.getsockname()[1]), 1.0) == (True, "")
        assert await checker.probe(Target("db.invalid", 5432), 1.0) == (False, "dns")

    asyncio.run(main())


def test_health_check_defaults():
    app = loads(json.dumps({"Apps": [{"Name": "a", "Ports": [1], "Targets": ["x:1"],
                                      "HealthCheck": {}}]})).apps[0]
    assert app.health_check == HealthCheck(2.0, 1.0, 2, 3)


def status(control) -> dict:
    result = run_cli("status", "--json", "--control", str(control))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def check_of(control, target: str) -> dict | None:
    for app in status(control)["apps"]:
        for t in app["targets"]:
            if t["target"] == target:
                return t.get("check")
    return None


def metric(port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    assert want  # a label set was asked for
    return total


@pytest.mark.parametrize("workers,host", [("1", "127.0.0.1"), ("2", "127.0.0.1"),
                                          ("2", "localhost")])  # a name: the resolver's addresses
def test_a_dead_target_is_checked_down_shared_by_all_workers_and_comes_back(
        tmp_path, start_proxy, make_backend, workers, host):
    live = make_backend("live")
    live_target = f"{host}:{live.port}"
    dead = dead_port()
    dead_target = f"{host}:{dead}"
    port, metrics_port = free_ports(2)
    control = tmp_path / "control.sock"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Apps": [{"Name": "app", "Ports": [port], "Targets": [
        live_target, dead_target], "HealthCheck": FAST}]}))
    proxy = start_proxy(config, "--workers", workers, "--control", str(control),
                        "--metrics", f"127.0.0.1:{metrics_port}")
    wait_until(lambda: (check_of(control, dead_target) or {}).get("state") == "down",
               "the dead target to be checked down")
    down = check_of(control, dead_target)
    assert down["error"] == "refused" and down["checks"] >= 2
    assert check_of(control, live_target)["state"] == "up"

    # one set of checks for the host: the live backend sees the checker's connects only
    wait_until(lambda: check_of(control, live_target)["checks"] >= 3, "three checks")
    before = check_of(control, live_target)["checks"]
    seen = live.connections
    after = check_of(control, live_target)["checks"]
    assert before - 1 <= seen <= after + 1, (before, seen, after)

    # down: not tried while the live one is up (no connect attempt, in any worker)
    attempts = metric(metrics_port, "flyproxy_connect_attempts_total", target=dead_target)
    for _ in range(30):
        assert greet(port) == "live"
    assert metric(metrics_port, "flyproxy_connect_attempts_total", target=dead_target) == attempts
    assert metric(metrics_port, "flyproxy_target_up", target=dead_target) == 0
    assert metric(metrics_port, "flyproxy_target_up", target=live_target) == 1

    # it comes back: Rise checks later it is up, and connections reach it again
    back = TaggedBackend("back", dead)
    try:
        wait_until(lambda: check_of(control, dead_target)["state"] == "up",
                   "the target to be checked up again")
        assert any(greet(port) == "back" for _ in range(40))
    finally:
        back.stop()
    out = proxy.output()
    assert out.count(f"target {dead_target} is down") == 1  # logged once, not per check
    assert out.count(f"target {dead_target} is up") == 1


def test_status_shows_the_check(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port = free_ports(1)[0]
    control = tmp_path / "control.sock"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"Apps": [
        {"Name": "checked", "Ports": [port], "Targets": [live.address], "HealthCheck": FAST}]}))
    start_proxy(config, "--control", str(control))
    wait_until(lambda: check_of(control, live.address)["checks"] >= 1, "a first check")
    out = run_cli("status", "--control", str(control)).stdout
    row = next(line for line in out.splitlines() if live.address in line)
    assert "STATE" in out and row.split()[-1] == "up", out
