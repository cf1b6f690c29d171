"""sk_lookup steering for real: programs in the kernel, each test in its own network namespace."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from appliance.demo import demo_document
from helpers import PYTHON, REPO, ProxyProcess, read_line, run_cli, status_of, wait_until
from netns import NetNS
from steering import LISTEN_PORT, Steered

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs: needs root"),
]

@pytest.fixture
def steered(tmp_path, bpffs):
    setups: list[Steered] = []

    def make(document: dict | None = None) -> Steered:
        s = Steered(tmp_path, bpffs, document or demo_document())
        setups.append(s)
        return s

    yield make
    for s in setups:
        s.close()


def ready(steered, document=None) -> Steered:
    s = steered(document)
    s.start_backends()
    s.load()
    s.start_proxy()
    s.register()
    return s


def bpftool(*args: str):
    out = subprocess.run(["bpftool", "--json", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def test_twelve_ports_reach_their_apps_through_one_listener(steered):
    s = ready(steered)
    for app in s.document["Apps"]:
        for port in app["Ports"]:
            assert s.greet(port) == app["Name"], f"port {port}"
    # IPv6 too: the dual-stack listener takes both families.
    assert s.greet(6300, "::1") == "six-thousand"
    assert s.status()["counters"]["steered"] == 13


def test_unconfigured_port_is_refused(steered):
    s = ready(steered)
    with pytest.raises(ConnectionRefusedError):
        s.connect(7777)
    with pytest.raises(ConnectionRefusedError):
        s.connect(LISTEN_PORT + 1)


def test_status_shows_the_truth(steered):
    s = ready(steered)
    cookie = s.register()  # registering again is harmless and returns the socket cookie
    status = s.status()
    want = {str(p): i for i, app in enumerate(s.document["Apps"]) for p in app["Ports"]}
    assert status["ports"] == want
    assert status["listener_cookie"] == cookie
    assert status["counters"] == {"steered": 0, "no_listener": 0, "assign_failed": 0}
    links = [l for l in bpftool("link", "show") if l["id"] == status["link"]["id"]]
    assert links and links[0]["prog_id"] == status["program"]["id"]
    assert links[0]["attach_type"] == "sk_lookup"
    text = s.bpf("status").stdout
    assert f"socket cookie {cookie}" in text and "ports:    12:" in text
    assert status["link"]["this_netns"] and "ANOTHER" not in text
    # the same pins read from outside the namespace they steer: it says so
    outside = subprocess.run([PYTHON, "-m", "appliance", "bpf", "status", "--pin-dir",
                              str(s.pin_dir)], capture_output=True, text=True, cwd=REPO,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert outside.returncode == 0, outside.stderr
    assert "ANOTHER network namespace" in outside.stdout


def test_counters_exported_for_node_exporter(steered, tmp_path):
    s = ready(steered)
    assert s.greet(5001) == "five-thousand"
    out = tmp_path / "flyproxy_bpf.prom"
    s.bpf("metrics", "--textfile", str(out))
    text = out.read_text()
    assert "flyproxy_bpf_steered_total 1\n" in text
    assert "flyproxy_bpf_ports 12\n" in text
    assert "flyproxy_bpf_listener_registered 1\n" in text
    assert oct(out.stat().st_mode)[-3:] == "644"


def test_sync_adds_and_removes_ports_while_kept_ports_carry_on(steered):
    s = ready(steered)
    held = s.connect(5001)
    assert read_line(held) == b"five-thousand"
    doc = demo_document()
    doc["Apps"][0]["Ports"] = [5001, 5300, 5400, 5555]  # 5200 removed, 5555 added
    s.write(doc)
    s.proxy.reload()  # the proxy learns the new ports first ...
    out = s.bpf("sync", "-c", str(s.cfg)).stdout  # ... then BPF steers them
    assert "1 added or changed, 1 removed" in out
    assert s.greet(5555) == "five-thousand"
    with pytest.raises(ConnectionRefusedError):
        s.connect(5200)
    held.sendall(b"still here\n")
    assert read_line(held) == b"still here"
    held.close()
    assert set(map(int, s.status()["ports"])) == {p for a in doc["Apps"] for p in a["Ports"]}


def test_port_without_listener_is_never_handed_to_another_socket(steered):
    """No listener registered: SK_DROP. The kernel answers a dropped lookup with a reset
    (sk_lookup cannot drop a SYN silently), and the port's own socket never gets it."""
    s = steered()
    s.load()  # loaded, but no listener registered
    with s.ns.entered():
        squatter = socket.socket()
    squatter.bind(("127.0.0.1", 5001))
    squatter.listen(8)
    squatter.settimeout(0.5)
    with pytest.raises(ConnectionRefusedError):
        s.connect(5001, timeout=5)
    with pytest.raises((TimeoutError, socket.timeout)):
        squatter.accept()  # nothing was queued for it
    squatter.close()
    assert s.status()["counters"]["no_listener"] == 1


def test_load_is_idempotent_and_unload_leaves_nothing(steered):
    s = ready(steered)
    first = s.status()
    assert "already loaded" in s.load()
    again = s.status()
    assert (again["program"], again["link"]) == (first["program"], first["link"])
    assert s.greet(5001) == "five-thousand"

    out = s.bpf("unload").stdout
    assert "unpinned" in out
    assert not s.pin_dir.exists()
    assert not [l for l in bpftool("link", "show") if l["id"] == first["link"]["id"]]
    assert not [p for p in bpftool("prog", "show") if p["id"] == first["program"]["id"]]
    with pytest.raises(ConnectionRefusedError):
        s.connect(5001)


def test_load_of_a_new_program_swaps_it_in_place(steered, tmp_path):
    s = ready(steered)
    before = s.status()
    source = (REPO / "bpf" / "steer.c").read_text()
    changed = source.replace("count(FLYPROXY_STEERED);", "count(FLYPROXY_STEERED);\n    count(FLYPROXY_STEERED);")
    assert changed != source
    (tmp_path / "steer2.c").write_text(changed)
    assert "program replaced" in s.load("--source", str(tmp_path / "steer2.c"))
    after = s.status()
    assert after["link"]["id"] == before["link"]["id"]  # same link, new program
    assert after["program"]["id"] != before["program"]["id"]
    assert after["listener_cookie"] == before["listener_cookie"]  # maps were reused
    assert s.greet(7001) == "seven-thousand"
    assert s.status()["counters"]["steered"] == 2  # the new program counts twice


def test_register_rejects_what_is_not_a_listening_tcp_socket(steered):
    s = steered()
    s.load()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    result = subprocess.run(
        s.ns.command([PYTHON, "-m", "appliance", "bpf", "register", "--fd", str(udp.fileno()),
                      "--pin-dir", str(s.pin_dir)]),
        pass_fds=(udp.fileno(),), capture_output=True, text=True, cwd=REPO, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    udp.close()
    assert result.returncode == 1
    assert "is not a TCP (stream) socket" in result.stderr
    result = s.bpf("register", "--pid", str(os.getpid()), "--wait", "0", "--control",
                   str(s.cfg.parent / "nothing.sock"), check=False)
    assert result.returncode == 1 and "no control socket" in result.stderr


def test_register_takes_only_the_proxys_listener_never_its_metrics_socket(steered):
    """With metrics on, the proxy has two listening sockets: register takes the one the
    proxy names as its listener, and refuses the metrics socket even by --port."""
    s = steered()
    s.start_backends()
    s.load()
    s.proxy = ProxyProcess(s.cfg, "--listen", f"[::]:{LISTEN_PORT}", "--metrics", "127.0.0.1:9464",
                           host=None, wrap=s.ns.command([]))
    result = s.bpf("register", "--pid", str(s.proxy.pid), "--port", "9464", "--wait", "0",
                   check=False)
    assert result.returncode == 1 and "holds 0 of the proxy's listeners on port 9464" \
        in result.stderr, result.stderr
    s.bpf("register", "--pid", str(s.proxy.pid))
    assert s.greet(6001) == "six-thousand"


def test_unprivileged_host_gets_one_clear_message():
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv")
    # A copy the unprivileged user can read wherever the checkout lives.
    copy = Path(tempfile.mkdtemp(prefix="flyproxy-unpriv-", dir="/tmp"))
    try:
        shutil.copytree(REPO / "appliance", copy / "appliance")
        shutil.copytree(REPO / "bpf", copy / "bpf")
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        result = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             "/usr/bin/python3", "-m", "appliance", "bpf", "build"],
            capture_output=True, text=True, cwd=copy, timeout=60,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy)})
    finally:
        shutil.rmtree(copy)
    assert result.returncode == 1, result.stderr
    assert "BPF steering cannot run on this host; missing:" in result.stderr
    assert "root (CAP_BPF" in result.stderr
    assert "Traceback" not in result.stderr


def test_make_bpf_compiles_and_verifies():
    result = run_cli("bpf", "build")
    assert result.returncode == 0, result.stderr
    assert "compiled and verified" in result.stdout


def test_workers_share_connections_evenly_through_their_group(steered, tmp_path):
    """With workers, `register --spread` puts their SO_REUSEPORT group in the program's group
    map: the kernel hashes each connection to one worker (on the shared listener alone, the
    first worker awake takes a whole burst). A killed worker's member stays open: its
    connections wait for the replacement instead of failing."""
    s = steered()
    s.start_backends()
    s.load()
    control = str(tmp_path / "control.sock")
    s.proxy = ProxyProcess(s.cfg, "--listen", f"[::]:{LISTEN_PORT}", "--workers", "2",
                           "--control", control, host=None, wrap=s.ns.command([]))
    out = s.bpf("register", "--pid", str(s.proxy.pid), "--port", str(LISTEN_PORT),
                "--spread").stdout
    assert "spread over the workers' groups in 16 lanes" in out
    assert s.status()["group_cookie"] is not None and len(s.status()["lane_cookies"]) == 16

    def workers() -> list[dict]:
        result = run_cli("status", "--control", control, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["workers"]

    held = []
    for _ in range(20):  # opened at once, as a burst: the case the group is for
        held.append(s.connect(5001))
    assert all(read_line(c) == b"five-thousand" for c in held)
    active = [w["active"] for w in workers()]
    assert sum(active) == 20 and all(active), active  # all 20 on one worker: 2**-19
    for c in held:
        c.close()

    os.kill(workers()[0]["pid"], signal.SIGKILL)  # its member stays open in the supervisor
    assert all(s.greet(6001) == "six-thousand" for _ in range(20))

    assert "worker group cleared" in s.bpf("unspread").stdout  # what the unit's ExecStop runs
    assert s.status()["group_cookie"] is None and s.status()["lane_cookies"] == []
    assert s.greet(7001) == "seven-thousand"  # the listener takes everything again
    assert "no worker group" in s.bpf("unspread").stdout  # idempotent (after a crash)


def test_spread_with_a_single_process_registers_no_group(steered):
    """On a one-CPU host the unit's `register --spread` finds no worker group: not an error,
    every connection goes to the listener."""
    s = steered()
    s.start_backends()
    s.load()
    s.start_proxy()
    out = s.bpf("register", "--pid", str(s.proxy.pid), "--spread").stdout
    assert "no worker group" in out
    assert s.status()["group_cookie"] is None and s.status()["listener_cookie"] is not None
    assert s.greet(5001) == "five-thousand"


def test_the_readmes_steering_by_hand_runs_as_a_script(tmp_path):
    """README "BPF steering by hand", pasted as it stands, in a network namespace of its
    own (``ip netns exec`` gives it a private /sys, where `bpf load` mounts its bpffs)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## BPF steering by hand"):]
    start = section.index("```sh\n") + 6
    block = section[start:section.index("\n```", start)]
    script = tmp_path / "steer.sh"
    script.write_text("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
                      + block.replace("/tmp/steer.json", str(tmp_path / "steer.json")) + "\n")
    ns = NetNS()
    try:
        out = subprocess.run(ns.command(["bash", str(script)]), capture_output=True, text=True,
                             timeout=180, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO),
                                  "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}"})
    finally:
        ns.delete()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "hi\n" in out.stdout  # the echo, through the steered port
    assert "registered listener [::]:8999" in out.stdout


def test_two_bpf_commands_never_change_one_pin_dir_at_once(steered):
    """A command that changes the pins waits for the lock another holds (bounded): with no
    wait allowed it fails, naming the lock; once free it runs."""
    import fcntl
    import hashlib

    s = steered()
    s.load()
    key = hashlib.sha256(os.path.realpath(s.pin_dir).encode()).hexdigest()[:12]
    with open(f"/run/lock/flyproxy-bpf-{key}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = s.ns.exec([PYTHON, "-m", "appliance", "bpf", "sync", "-c", str(s.cfg),
                          "--pin-dir", str(s.pin_dir)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                        "FLYPROXY_BPF_LOCK_WAIT": "0"})
        assert busy.returncode == 1 and "another flyproxy bpf command is changing" in busy.stderr
    s.bpf("sync", "-c", str(s.cfg))


def test_each_app_queues_in_a_lane_of_its_own(steered, tmp_path):
    """A flood on one app fills that app's accept queues, never another's: with the workers
    stopped (nothing accepts), connections to two apps wait in two different lanes' listening
    sockets, and are all served once the workers go on."""
    s = steered()
    s.start_backends()
    s.load()
    control = str(tmp_path / "control.sock")
    s.proxy = ProxyProcess(s.cfg, "--listen", f"[::]:{LISTEN_PORT}", "--workers", "2",
                           "--control", control, host=None, wrap=s.ns.command([]))
    assert "in 16 lanes" in s.bpf("register", "--pid", str(s.proxy.pid), "--port",
                                  str(LISTEN_PORT), "--spread").stdout
    pids = [w["pid"] for w in status_of(control)["workers"]]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        held = [s.connect(5001) for _ in range(3)] + [s.connect(6001) for _ in range(2)]

        def queued() -> dict[int, int]:  # listening port -> connections waiting in its queue
            out = s.ns.exec(["ss", "-Hltn"], capture_output=True, text=True, check=True).stdout
            waiting: dict[int, int] = {}
            for line in out.splitlines():
                _, recv_q, _, local = line.split()[:4]
                port = int(local.rsplit(":", 1)[1])
                waiting[port] = waiting.get(port, 0) + int(recv_q)
            return {port: n for port, n in waiting.items() if n}

        # (the handshake is the kernel's: each connect returned once queued)
        wait_until(lambda: sorted(queued().values()) == [2, 3], "two lanes holding 3 and 2")
        assert LISTEN_PORT not in queued()  # not the shared listener: the apps' own lanes
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    assert [read_line(c) for c in held] == [b"five-thousand"] * 3 + [b"six-thousand"] * 2
    for c in held:
        c.close()
