"""Upgrades by reload: the code on disk changes under a running proxy; `flyproxy reload`
starts a new generation of workers on it, and the old generation finishes its
connections (idle, mid-transfer, half-closed) while new connections go to the new one.

Each proxy runs from a copy of the package (``copy_of_the_code``) that the test changes,
as a package upgrade changes /usr/lib/python3/dist-packages/appliance. Per-port mode runs
in a network namespace of its own with ``net.ipv4.tcp_migrate_req=1`` (what the role
sets): a connection queued on an old worker's listener when it closes moves to a new
worker's instead of being reset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from held import Prober
from helpers import (ProxyProcess, TaggedBackend, connect, copy_of_the_code, free_ports,
                     read_line, refused, run_cli, run_from, wait_until, write_config)
from netns import NetNS

pytestmark = pytest.mark.root

HELD_IDLE, HELD_STREAMING, HELD_HALF_CLOSED = 100, 50, 50
CHUNK = 256 * 1024


class HoldingBackend:
    """Greets with its tag; reads until the client's EOF, then waits for ``release``
    before it answers with the sha256 of what it read: a connection stays half-closed
    for as long as the test wants."""

    def __init__(self, tag: str):
        self.tag = tag
        self.release = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(120)
            try:
                conn.sendall(self.tag.encode() + b"\n")
                h = hashlib.sha256()
                while data := conn.recv(65536):
                    h.update(data)
                if self.release.wait(120):
                    conn.sendall(h.hexdigest().encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        self.release.set()
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def status(control: str) -> dict:
    out = run_cli("status", "--control", control, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def bump_version(root: Path, version: str) -> None:
    init = root / "appliance/__init__.py"
    init.write_text(re.sub(r'__version__ = "([^"]+)"', rf'__version__ = "\1+{version}"',
                           init.read_text()))


class One:
    """One app on one port to a tagged backend, and a supervised proxy with 2 workers run
    from a copy of the package (``copy``), which the test may change as an upgrade would."""

    def __init__(self, tmp_path: Path, make_backend):
        self.tmp_path = tmp_path
        self.backend = make_backend("b")
        self.port, self.metrics_port = free_ports(2)
        self.cfg = write_config(tmp_path / "config.json",
                                {"a": ([self.port], [self.backend.address])})
        self.control = str(tmp_path / "control.sock")
        self.root: Path | None = None
        self.proxy: ProxyProcess | None = None

    def start(self, *args: str, copy: bool = True, metrics: bool = False) -> ProxyProcess:
        more = ["--metrics", f"127.0.0.1:{self.metrics_port}"] if metrics else []
        wrap = None
        if copy:
            self.root = copy_of_the_code(self.tmp_path)
            wrap = run_from(self.root)
        self.proxy = ProxyProcess(self.cfg, "--workers", "2", "--control", self.control,
                                  *args, *more, wrap=wrap)
        return self.proxy


@pytest.fixture
def lab1(tmp_path, make_backend):
    one = One(tmp_path, make_backend)
    yield one
    if one.proxy is not None:
        one.proxy.stop()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Held:
    """200 connections through the proxy: idle, streaming (half their bytes sent before the
    upgrade, half after, sha256 checked) and half-closed (EOF sent before the upgrade, the
    backend's answer after)."""

    def __init__(self, port: int, half_port: int, namespace):
        self.idle = [self._open(port, namespace, b"echo") for _ in range(HELD_IDLE)]
        self.streaming = [self._open(port, namespace, b"echo") for _ in range(HELD_STREAMING)]
        self.half = [self._open(half_port, namespace, b"holding") for _ in range(HELD_HALF_CLOSED)]
        self.sent = [hashlib.sha256() for _ in self.streaming]
        self.received = [hashlib.sha256() for _ in self.streaming]
        self.half_sent = []

    @staticmethod
    def _open(port, namespace, tag):
        s = connect(port, namespace=namespace, timeout=30)
        assert read_line(s) == tag
        return s

    def _stream(self, i: int) -> None:
        data = os.urandom(CHUNK)
        s = self.streaming[i]
        self.sent[i].update(data)
        s.sendall(data)
        got = 0
        while got < len(data):
            chunk = s.recv(min(65536, len(data) - got))
            assert chunk, "the proxy closed a streaming connection"
            self.received[i].update(chunk)
            got += len(chunk)

    def before(self) -> None:
        for i in range(len(self.streaming)):
            self._stream(i)
        for s in self.half:
            data = os.urandom(4096)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            self.half_sent.append(hashlib.sha256(data).hexdigest())

    def after(self, backend: HoldingBackend) -> None:
        for i in range(len(self.streaming)):
            self._stream(i)
            assert self.sent[i].digest() == self.received[i].digest()
        for s in self.idle:
            s.sendall(b"still here\n")
            assert read_line(s) == b"still here"
        backend.release.set()
        for s, digest in zip(self.half, self.half_sent):
            assert read_line(s).decode() == digest

    def close(self) -> None:
        for s in self.idle + self.streaming + self.half:
            s.close()


@pytest.fixture
def lab(tmp_path):
    ns = NetNS("flyproxy-upg")
    ns.exec(["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"], check=True)
    things = []
    yield ns, things
    for thing in reversed(things):
        thing.close() if hasattr(thing, "close") else thing.stop()
    ns.delete()


@pytest.mark.parametrize("mode", ["per-port", "handed-in"])
def test_an_upgrade_by_reload_keeps_every_connection(lab, tmp_path, mode):
    ns, things = lab
    with ns.entered():
        echo = TaggedBackend("echo")
        holding = HoldingBackend("holding")
    things += [echo, holding]
    port, half_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"echo": ([port], [echo.address]),
                                                  "holding": ([half_port], [f"127.0.0.1:{holding.port}"])})
    args = ["--workers", "2", "--control", str(tmp_path / "control.sock"), "--drain-time", "30"]
    fds = ()
    if mode == "handed-in":  # the sockets handed in, as systemd's are
        with ns.entered():
            handed = [socket.create_server(("127.0.0.1", p), backlog=4096)
                      for p in (port, half_port)]
        things += handed
        fds = tuple(s.fileno() for s in handed)
        args += [a for fd in fds for a in ("--fd", str(fd))]
    root = copy_of_the_code(tmp_path)
    proxy = ProxyProcess(cfg, *args, wrap=ns.command(run_from(root)), pass_fds=fds,
                         host=None if fds else "127.0.0.1")
    things.append(proxy)
    control = str(tmp_path / "control.sock")
    before = status(control)
    assert before["mode"] == mode
    old_pids = before["generations"][-1]["pids"]
    held = Held(port, half_port, ns.entered)
    held.before()
    prober = Prober(port, "echo", ns.entered)

    bump_version(root, "upgrade1")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    assert "upgraded to 0.3.0+upgrade1" in out.stdout

    after = status(control)
    assert after["version"] == "0.3.0+upgrade1"
    old, new = after["generations"]
    assert old["version"] == before["version"] and old["draining_since"] is not None
    # (a worker that held none of them has drained already: only the others are left)
    assert old["pids"] and set(old["pids"]) <= set(old_pids)
    assert new["version"] == "0.3.0+upgrade1" and new["draining_since"] is None
    assert set(new["pids"]).isdisjoint(old_pids) and len(new["pids"]) == 2
    assert old["active"] >= len(held.idle) + len(held.streaming) + len(held.half), after
    shown = run_cli("status", "--control", control).stdout
    assert "version 0.3.0+upgrade1" in shown and "generation 1 (version 0.3.0" in shown
    assert "draining since" in shown, shown
    # the supervisor runs the new code too: re-executed in place (same pid)
    assert proxy.proc.poll() is None
    assert f"re-executing the supervisor (pid {proxy.pid})" in proxy.output()

    # a second upgrade while the first generation still drains: it is handed over too
    bump_version(root, "upgrade2")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    gens = status(control)["generations"]
    # (generation 2 held only the prober's short connections: it may be gone already)
    assert gens[0]["version"] == before["version"] and gens[-1]["version"].endswith("upgrade2")
    assert set(gens[0]["pids"]) <= set(old_pids)
    assert gens[0]["draining_since"] == old["draining_since"]
    assert f"adopted 2 workers of generation 2 and {len(old['pids'])} draining" \
        in proxy.output()

    held.after(holding)
    ok, failed = prober.finish()
    assert failed == [] and ok > 0
    # one connection stays past --drain-time: closed, with a line, and the old workers go
    last = connect(port, namespace=ns.entered, timeout=30)
    assert read_line(last) == b"echo"  # (on the new generation: not closed)
    held.close()
    old_pids += new["pids"]
    wait_until(lambda: not any(map(alive, old_pids)), "the old generations gone", 60)
    assert len(status(control)["generations"]) == 1
    last.sendall(b"new\n")
    assert read_line(last) == b"new"
    last.close()
    assert "worker generation 1 finished draining" in proxy.output()


def test_a_broken_install_fails_the_reload_and_changes_nothing(lab1):
    lab1.start()
    port, cfg, control = lab1.port, lab1.cfg, lab1.control
    root = lab1.root
    held = connect(port)
    assert read_line(held) == b"b"
    before = status(control)
    relay = root / "appliance/dataplane/relay.py"
    relay.write_text(relay.read_text() + "\nthis is not python (\n")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 1
    assert "upgrade refused" in out.stderr and "SyntaxError" in out.stderr, out.stderr
    after = status(control)
    assert after["generations"] == before["generations"]
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in before["workers"]]
    held.sendall(b"hi\n")
    assert read_line(held) == b"hi"
    held.close()


def test_new_workers_on_unchanged_code_and_the_counters_stay_monotonic(lab1):
    """``reload --new-workers``: a new generation on the same code; the old one's counts
    stay in the totals once it is gone."""
    lab1.start(metrics=True, copy=False)
    port, cfg, control = lab1.port, lab1.cfg, lab1.control
    metrics_port = lab1.metrics_port
    for _ in range(20):
        with connect(port) as s:
            assert read_line(s) == b"b"

    def accepted() -> float:
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=10).read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith("flyproxy_connections_accepted_total{"))

    wait_until(lambda: accepted() >= 20, "20 accepted connections counted")
    old_pids = status(control)["generations"][-1]["pids"]
    out = run_cli("reload", "--new-workers", "--control", control, "-c", str(cfg),
                  "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not any(map(alive, old_pids)), "the old generation gone")
    assert accepted() >= 20
    generations = status(control)["generations"]
    assert len(generations) == 1 and generations[0]["generation"] == 2


def test_what_is_left_at_the_drain_deadline_is_closed_with_a_line_each(lab1):
    lab1.start("--drain-time", "5", metrics=True, copy=False)
    port, cfg, control, proxy = lab1.port, lab1.cfg, lab1.control, lab1.proxy
    metrics_port = lab1.metrics_port
    held = [connect(port) for _ in range(4)]
    assert all(read_line(s) == b"b" for s in held)
    old_pids = status(control)["generations"][-1]["pids"]
    out = run_cli("reload", "--new-workers", "--control", control, "-c", str(cfg),
                  "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    assert 'flyproxy_generation_connections_active{generation="1"} 4.0' in body
    assert 'flyproxy_generation_connections_active{generation="2"} 0.0' in body
    wait_until(lambda: not any(map(alive, old_pids)), "the old generation gone", 30)
    for s in held:  # ended by the old workers at the deadline (a reset, as an abort is)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert proxy.output().count("closing at the drain deadline: app=a") == 4
    assert [greet_one(port)] == ["b"]


def greet_one(port: int) -> str:
    with connect(port) as s:
        return read_line(s).decode()


def test_new_workers_that_die_while_starting_fail_the_upgrade_and_the_old_ones_serve(lab1):
    lab1.start()
    port, cfg, control, proxy = lab1.port, lab1.cfg, lab1.control, lab1.proxy
    root = lab1.root
    held = connect(port)
    assert read_line(held) == b"b"
    before = status(control)["generations"]
    # the new code imports and loads the config (the preflight passes), but its
    # workers die as they start
    launch = root / "appliance/service/launch.py"
    launch.write_text(launch.read_text().replace(
        '    """A worker: the config in force comes from its supervisor',
        '    import signal; os.kill(os.getpid(), signal.SIGKILL)\n'
        '    """A worker: the config in force comes from its supervisor', 1))
    bump_version(root, "broken")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 1 and "upgrade to 0.3.0+broken failed" in out.stderr, out.stderr
    after = status(control)["generations"]
    assert [(g["generation"], g["pids"]) for g in after] == \
        [(g["generation"], g["pids"]) for g in before]
    assert proxy.proc.poll() is None
    held.sendall(b"hi\n")
    assert read_line(held) == b"hi"
    assert [greet_one(port) for _ in range(10)] == ["b"] * 10
    held.close()


def test_sigterm_during_an_upgrade_stops_every_generation_cleanly(lab1):
    lab1.start("--grace-period", "3")
    port, cfg, control, proxy = lab1.port, lab1.cfg, lab1.control, lab1.proxy
    root = lab1.root
    held = connect(port)
    assert read_line(held) == b"b"
    pids = status(control)["generations"][-1]["pids"]
    bump_version(root, "upgrade1")
    done = []
    reload = threading.Thread(target=lambda: done.append(run_cli(
        "reload", "--control", control, "-c", str(cfg), "--pin-dir", "")), daemon=True)
    reload.start()
    wait_until(lambda: "re-executing the supervisor" in proxy.output(), "the re-exec")
    proxy.signal(15)  # SIGTERM, blocked across the exec: delivered to the new image
    assert proxy.wait(timeout=40) == 0
    reload.join(40)
    assert done and done[0].returncode == 1, done
    assert not any(map(alive, pids))
    # every worker of every generation is gone: no process of ours is left
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _ours(int(p), root)]
    try:
        assert held.recv(10) == b""  # closed at the end of the grace period
    except ConnectionResetError:
        pass
    held.close()


def _ours(pid: int, root: Path) -> bool:
    try:
        return str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_a_worker_killed_after_an_upgrade_is_replaced_in_its_generation(lab1):
    """A new-generation worker that dies is started again on the new code; the draining
    generation is untouched (its workers are never restarted: they are on their way out)."""
    lab1.start("--drain-time", "60")
    port, cfg, control = lab1.port, lab1.cfg, lab1.control
    root = lab1.root
    held = connect(port)  # keeps the old generation draining
    assert read_line(held) == b"b"
    bump_version(root, "upgrade1")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    old, new = status(control)["generations"]
    os.kill(new["pids"][0], 9)
    wait_until(lambda: (lambda g: len(g) == 2 and len(g[1]["pids"]) == 2
                        and new["pids"][0] not in g[1]["pids"]
                        and all(map(alive, g[1]["pids"])))(status(control)["generations"]),
               "the killed worker replaced in the new generation", 30)
    gens = status(control)["generations"]
    # the old generation: only its own workers (none restarted), the held one's still there
    assert gens[0]["pids"] and set(gens[0]["pids"]) <= set(old["pids"])
    assert gens[0]["active"] == 1 and gens[-1]["version"].endswith("upgrade1")
    held.sendall(b"hi\n")
    assert read_line(held) == b"hi"
    assert greet_one(port) == "b"
    held.close()


def test_limits_count_every_generation_and_survive_the_re_exec(lab1):
    """MaxConnections is the host's, across an upgrade: the supervisor re-executes with the
    limits table in hand, the draining generation's connections still count, and once they
    end the new generation may open as many."""
    lab1.cfg.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [lab1.port],
                                              "Targets": [lab1.backend.address],
                                              "MaxConnections": 3}]}))
    proxy = lab1.start()
    held = [connect(lab1.port) for _ in range(3)]
    assert [read_line(s) for s in held] == [b"b"] * 3
    pid = proxy.pid
    bump_version(lab1.root, "upgrade1")
    out = run_cli("reload", "--control", lab1.control, "-c", str(lab1.cfg), "--pin-dir", "")
    assert out.returncode == 0 and "upgraded to" in out.stdout, out.stdout + out.stderr
    assert status(lab1.control)["generations"][0]["active"] == 3  # draining, still open
    assert proxy.pid == pid  # (the same supervisor, re-executed)
    assert refused(lab1.port)  # the old generation's 3 count for the new one
    held.pop().close()
    wait_until(lambda: not refused(lab1.port), "a new connection served once one ended")
    for s in held:
        s.close()


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_the_options_survive_an_upgrade_and_the_new_code_must_know_them(lab1):
    """The re-executed supervisor and the new workers run with the options the proxy was
    started with (settings.ServeConfig, written out whole); new code that no longer knows
    one of them is refused by the preflight, before anything changes."""
    lab1.start("--eject", "7", "--drain-time", "60", metrics=True)
    cfg, control, proxy = lab1.cfg, lab1.control, lab1.proxy
    bump_version(lab1.root, "upgrade1")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    supervisor = _argv(proxy.pid)
    assert "--resume-fd" in supervisor, supervisor  # (the new image)
    assert _option(supervisor, "--eject") == "7.0"
    assert _option(supervisor, "--drain-time") == "60.0"
    assert _option(supervisor, "--control") == control
    assert _option(supervisor, "--metrics") == f"127.0.0.1:{lab1.metrics_port}"
    assert _option(supervisor, "--log-level") == "debug"
    for pid in status(control)["generations"][-1]["pids"]:
        worker = _argv(pid)
        assert _option(worker, "--eject") == "7.0" and _option(worker, "--workers") == "2"
        assert _option(worker, "--metrics") == "" and _option(worker, "--control") == ""
        assert "--collect-metrics" in worker and _option(worker, "--config") == str(cfg)
    with urllib.request.urlopen(f"http://127.0.0.1:{lab1.metrics_port}/metrics",
                                timeout=10) as reply:
        assert b"flyproxy_workers 2" in reply.read()

    before = status(control)["generations"]
    settings = lab1.root / "appliance/settings.py"
    settings.write_text(settings.read_text().replace('"--eject"', '"--passive-eject"', 1))
    bump_version(lab1.root, "upgrade2")
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 1 and "upgrade refused" in out.stderr, out.stderr
    assert "unrecognized arguments: --eject 7.0" in out.stderr, out.stderr
    assert status(control)["generations"] == before
