"""`make run`: the offline demo (``flyproxy demo``), as an operator meets it.

It binds the challenge's fixed ports (5001-7400) and its echo targets (15001-17002), so it
runs in a network namespace of its own: nothing on the host can hold those ports, and the
demo cannot take them from anything else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest
from helpers import PYTHON, REPO, WAIT_S, NotifySocket, connect, recv_all
from netns import NetNS

from appliance.demo import demo_document


@pytest.fixture
def netns():
    ns = NetNS("flyproxy-demo")
    yield ns
    ns.delete()


def echoed(ns: NetNS, port: int, payload: bytes = b"hello\n") -> bytes:
    with connect(port, namespace=ns.entered) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def test_the_demo_serves_every_app_reloads_refuses_a_broken_config_and_leaves_nothing(
        tmp_path, netns):
    temp = tmp_path / "tmp"  # where the demo makes its own directory
    temp.mkdir()
    notify = NotifySocket(tmp_path)
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            netns.command([PYTHON, "-m", "appliance", "demo"]), cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp),
                 "NOTIFY_SOCKET": notify.path})
    try:
        notify.wait_for("READY", "1")
        demo_dir, = temp.iterdir()
        config = demo_dir / "config.json"
        assert str(config) in log_path.read_text()  # the operator is told what to edit

        document = demo_document()
        for app in document["Apps"]:
            for port in app["Ports"]:
                assert echoed(netns, port) == b"hello\n", (app["Name"], port)
        # six-thousand's third target never resolves: ten more connections, none notices
        for _ in range(10):
            assert echoed(netns, 6300) == b"hello\n"

        # Hot reload, as the demo's banner says: edit the file, SIGHUP.
        document["Apps"][0]["Ports"].append(5999)
        config.write_text(json.dumps(document))
        held = connect(5001, namespace=netns.entered)  # open across both reloads
        held.sendall(b"before\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1")
        assert "generation 2" in notify.wait_for("READY", "1")["STATUS"]
        assert echoed(netns, 5999) == b"hello\n"

        # A broken file is refused, named with line and column; the old config keeps serving.
        config.write_text('{"Apps": [\n  {"Name": 1')
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1")
        assert "reload failed" in notify.wait_for("READY", "1")["STATUS"]
        assert echoed(netns, 5999) == b"hello\n"
        output = log_path.read_text()
        assert f"{config}:2:13: invalid JSON" in output, output

        held.sendall(b"after\n")
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b"before\nafter\n"
        held.close()

        # Ctrl-C: a graceful stop, and the demo's own directory is gone.
        proc.send_signal(signal.SIGINT)
        assert proc.wait(WAIT_S) == 0, log_path.read_text()
        assert list(temp.iterdir()) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(WAIT_S)
        notify.close()
