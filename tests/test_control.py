"""The control socket: `flyproxy reload` (synchronous) and `flyproxy status`."""

from __future__ import annotations

import json

from helpers import connect, free_ports, greet, read_line, run_cli, write_config


def start(tmp_path, start_proxy, make_backend):
    backend = make_backend("one")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "control.sock")
    return start_proxy(cfg, "--control", control), cfg, control, port


def test_reload_returns_after_the_proxy_applied_it(tmp_path, start_proxy, make_backend):
    proxy, cfg, control, port = start(tmp_path, start_proxy, make_backend)
    two = make_backend("two")
    added, = free_ports(1)
    write_config(cfg, {"a": ([port], [two.address]), "b": ([added], [two.address])})
    result = run_cli("reload", "-c", str(cfg), "--control", control, "--pin-dir", "")
    assert result.returncode == 0, result.stderr
    assert "reloaded to generation 2" in result.stdout
    assert greet(added) == "two"  # no waiting: the command returned after the proxy applied it
    assert greet(port) == "two"


def test_reload_with_a_bad_config_fails_and_changes_nothing(tmp_path, start_proxy, make_backend):
    proxy, cfg, control, port = start(tmp_path, start_proxy, make_backend)
    held = connect(port)
    assert read_line(held) == b"one"
    cfg.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [port], "Targets": ["nope"]}]}))
    result = run_cli("reload", "-c", str(cfg), "--control", control, "--pin-dir", "")
    assert result.returncode == 1
    assert f"{cfg}: Apps[0].Targets[0]: 'nope': not host:port" in result.stderr
    status = json.loads(run_cli("status", "--control", control, "--json").stdout)
    assert status["generation"] == 1
    assert greet(port) == "one"
    held.sendall(b"x\n")
    assert read_line(held) == b"x"
    held.close()


def test_status_shows_apps_ports_targets_and_connections(tmp_path, start_proxy, make_backend):
    proxy, cfg, control, port = start(tmp_path, start_proxy, make_backend)
    held = connect(port)
    assert read_line(held) == b"one"
    status = json.loads(run_cli("status", "--control", control, "--json").stdout)
    assert status["active"] == 1
    assert status["apps"][0]["ports"] == [port] and status["apps"][0]["active"] == 1
    table = run_cli("status", "--control", control).stdout
    assert "APP" in table and f"a    {port}" in table
    held.close()


def test_reload_without_a_running_proxy_says_so(tmp_path):
    cfg = write_config(tmp_path / "config.json", {"a": ([1], ["127.0.0.1:1"])})
    result = run_cli("reload", "-c", str(cfg), "--control", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "no control socket (is the proxy running?)" in result.stderr
