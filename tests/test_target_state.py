"""`flyproxy status` tells one state per target, combining what the proxy knows: active
checks, passive ejection, DNS, and whether anything reached it yet."""

from __future__ import annotations

import json

import pytest

from helpers import dead_port, free_ports, greet, run_cli, wait_until

FAST = {"Interval": 0.2, "Timeout": 0.5, "Rise": 1, "Fall": 1}


def status(control: str) -> dict:
    out = run_cli("status", "--control", control, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def targets(control: str) -> dict:
    return {(a["name"], t["target"]): t for a in status(control)["apps"] for t in a["targets"]}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_each_target_has_one_state_with_its_reason(tmp_path, start_proxy, make_backend, workers):
    live = make_backend("live")
    checked_dead = f"127.0.0.1:{dead_port()}"
    passive_dead = f"127.0.0.1:{dead_port()}"
    idle = make_backend("idle")  # never tried: its app gets no connection
    ports = free_ports(3)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"Apps": [
        {"Name": "checked", "Ports": [ports[0]], "Targets": [live.address, checked_dead],
         "HealthCheck": FAST},
        {"Name": "passive", "Ports": [ports[1]], "Targets": [passive_dead, live.address]},
        {"Name": "quiet", "Ports": [ports[2]], "Targets": [idle.address,
                                                           "bad.target.for.testing:6003"]}]}))
    control = str(tmp_path / "control.sock")
    start_proxy(cfg, "--control", control, "--workers", workers, "--eject", "60")
    wait_until(lambda: targets(control)[("checked", checked_dead)]["state"] == "down",
               "the checks take the dead target down")
    for _ in range(30):  # the odds the dead one is never tried first: (1/2)^30 per worker
        assert greet(ports[1]) == "live"
    rows = targets(control)
    down = rows[("checked", checked_dead)]
    assert down["text"].startswith("down (checks: refused, ") and down["text"].endswith(" s)")
    assert rows[("checked", live.address)]["state"] == "up"
    ejected = rows[("passive", passive_dead)]
    assert ejected["state"] == "ejected" and ejected["reason"] == "connect refused"
    assert ejected["text"].endswith(" s left)")
    if workers == "2":  # each worker ejects on its own: both saw it, or the text says which
        assert ejected["text"].startswith("ejected (connect refused, ")
    assert rows[("passive", live.address)]["state"] == "up"
    assert rows[("quiet", idle.address)]["text"] == "unknown (never tried)"
    bad = rows[("quiet", "bad.target.for.testing:6003")]
    assert bad["state"] == "no address", bad
    table = run_cli("status", "--control", control).stdout
    line = next(x for x in table.splitlines() if checked_dead in x)
    assert "down (checks: refused," in line and "ok" not in line.split()
