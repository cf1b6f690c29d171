"""The supervisor under faults: thousands of health check changes at once, a worker that
cannot start, internal commands on the public control socket.

Each test runs real processes on real sockets; the mass-change test runs in a network
namespace of its own, where one listener on 0.0.0.0 answers for 2,000 loopback addresses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest

from helpers import (ProxyProcess, TaggedBackend, connect, copy_of_the_code, free_ports, greet,
                     read_line, run_cli, run_from, wait_until, write_config)
from netns import NetNS

N_TARGETS = 2000


class Flappy:
    """One listener on 0.0.0.0:PORT (inside a namespace) that accepts and closes whatever
    connects (the health checks): up while open, refusing everything once closed."""

    def __init__(self, ns: NetNS, port: int = 0):
        with ns.entered():
            self.sock = socket.create_server(("0.0.0.0", port), backlog=4096)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.sock.close()
        self.thread.join(10)


def status(control: str) -> dict:
    out = run_cli("status", "--control", control, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _app(reply: dict, name: str) -> dict:
    return next(a for a in reply["apps"] if a["name"] == name)


def _checks_down(reply: dict, name: str) -> int:
    return sum(t["check"]["state"] == "down" for t in _app(reply, name)["targets"])


@pytest.mark.root
def test_2000_targets_going_down_and_up_together_cost_no_worker_and_no_connection(tmp_path):
    """Every change reaches every worker as one delta message; heartbeats keep being
    answered (no worker is replaced), held connections of another app live, new ones
    succeed, and the log says it in a few bounded lines."""
    ns = NetNS("flyproxy-sup")
    proxy = None
    try:
        flappy = Flappy(ns)  # every 127.x address, in the netns
        with ns.entered():
            steady = TaggedBackend("steady")
        port = flappy.port
        targets = [f"127.1.{i // 200}.{i % 200 + 1}:{port}" for i in range(N_TARGETS)]
        cfg = tmp_path / "config.json"
        cfg.write_text(json.dumps({"Apps": [
            {"Name": "flappy", "Ports": [7100], "Targets": targets,
             "HealthCheck": {"Interval": 0.01, "Timeout": 0.5, "Rise": 1, "Fall": 1}},
            {"Name": "steady", "Ports": [7200], "Targets": [steady.address]}]}))
        control = str(tmp_path / "control.sock")
        proxy = ProxyProcess(cfg, "--workers", "2", "--control", control,
                             wrap=ns.command([]))
        before = status(control)
        pids = [w["pid"] for w in before["workers"]]
        held = []
        for _ in range(50):
            s = connect(7200, namespace=ns.entered, timeout=30)
            assert read_line(s) == b"steady"
            held.append(s)

        def all_workers_hold(n: int) -> bool:
            reply = status(control)
            return (_checks_down(reply, "flappy") == n
                    and set(_app(reply, "flappy")["held_down"].values()) == {n})

        for flip in range(2):
            flappy.close()  # all 2,000 refuse at once
            wait_until(lambda: all_workers_hold(N_TARGETS), "2,000 down in every worker", 90)
            assert [greet(7200, namespace=ns.entered) for _ in range(20)] == ["steady"] * 20
            flappy = Flappy(ns, port)
            wait_until(lambda: all_workers_hold(0), "all 2,000 up in every worker", 90)
        after = status(control)
        assert [w["pid"] for w in after["workers"]] == pids and after["restarts"] == 0
        for s in held:  # every held connection of the other app still relays
            s.sendall(b"still here\n")
            assert read_line(s) == b"still here"
            s.close()
        log = proxy.output()
        assert "Future exception was never retrieved" not in log
        assert max(map(len, log.splitlines())) < 2000, "a log line carries a message's body"
        assert log.count(" is down: ") <= 200, "4,000 changes logged one by one"
        assert "more targets went down" in log
        assert "HealthCheck Interval 0.01s raised to 4s" in log  # the host's check budget
        flappy.close()
    finally:
        if proxy is not None:
            proxy.stop()
        ns.delete()


def test_a_worker_that_cannot_start_leaves_the_others_serving(tmp_path, make_backend):
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    root = copy_of_the_code(tmp_path)
    control = str(tmp_path / "control.sock")
    proxy = ProxyProcess(cfg, "--workers", "2", "--control", control, wrap=run_from(root))
    try:
        first = status(control)
        assert first["workers"][0]["pid"] != first["workers"][1]["pid"]
        relay = root / "appliance/dataplane/relay.py"
        good = relay.read_text()
        relay.write_text(good + "\nthis is not python (\n")  # what a new worker imports
        os.kill(first["workers"][1]["pid"], signal.SIGKILL)
        wait_until(lambda: status(control)["workers"][1]["failing"], "worker 1 failing", 30)
        reply = status(control)
        assert reply["workers"][0]["ready"]
        assert reply["workers"][0]["pid"] == first["workers"][0]["pid"]
        assert [greet(port) for _ in range(10)] == ["b"] * 10  # the healthy worker serves
        held = connect(port)  # (on worker 0: the only one listening)
        assert read_line(held) == b"b"
        assert proxy.proc.poll() is None
        shown = run_cli("status", "--control", control)
        assert "FAILING" in shown.stdout, shown.stdout
        assert "SyntaxError" in proxy.output()
        relay.write_text(good)  # fixed: it is back within the back-off
        wait_until(lambda: all(w["ready"] and not w["failing"]
                               for w in status(control)["workers"]), "both workers back", 30)
        assert "started again after failing" in proxy.output()
        held.sendall(b"hi\n")  # untouched by all of it
        assert read_line(held) == b"hi"
        held.close()
    finally:
        proxy.stop()


def test_the_control_socket_refuses_a_workers_internal_health_command(start_proxy, tmp_path,
                                                                       make_backend):
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "control.sock")
    start_proxy(cfg, "--control", control)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(control)
        s.sendall(json.dumps({"command": "health " + json.dumps(
            {"reset": True, "down": [["a", backend.address]], "up": []})}).encode() + b"\n")
        reply = json.loads(read_line(s))
    assert not reply["ok"] and "not a control command" in reply["error"]
    assert _app(status(control), "a")["held_down"] == 0
    assert greet(port) == "b"
