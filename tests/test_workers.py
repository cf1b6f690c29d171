"""More than one worker: connections spread, reload and status fan out, metrics add up,
a dead worker is replaced, shutdown drains every worker, workers never outlive the
supervisor."""

from __future__ import annotations

import asyncio
import json
import json as _json
import os
import signal
import socket
import threading

import pytest

from helpers import (WAIT_S, closed_by_peer, connect, free_ports, greet, read_line, run_cli,
                     sample, scrape, wait_until, write_config)

N = 2


def status(control: str) -> dict:
    result = run_cli("status", "--control", control, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a child of ours that exited is a zombie until reaped: that counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def hold(port: int, n: int, tag: str) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        s = connect(port)
        assert read_line(s) == tag.encode()
        conns.append(s)
    return conns


@pytest.fixture
def workers(tmp_path, start_proxy, make_backend):
    """A proxy with N workers in per-port mode, one app on one port; (proxy, cfg, control, port)."""
    backend = make_backend("one")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "control.sock")
    proxy = start_proxy(cfg, "--control", control, "--workers", str(N))
    return proxy, cfg, control, port


def test_connections_spread_over_every_worker(workers):
    proxy, cfg, control, port = workers
    conns = hold(port, 20, "one")  # SO_REUSEPORT hashes each connection: all 20 on one: 2**-19
    st = status(control)
    assert st["active"] == 20 and st["apps"][0]["active"] == 20
    assert len(st["workers"]) == N and all(w["ready"] for w in st["workers"])
    assert all(w["active"] > 0 for w in st["workers"]), st["workers"]
    assert sum(w["active"] for w in st["workers"]) == 20
    assert proxy.pid not in {w["pid"] for w in st["workers"]}
    for s in conns:
        s.close()


def test_reload_reaches_every_worker_and_a_bad_one_changes_nothing(workers, make_backend):
    proxy, cfg, control, port = workers
    held = hold(port, 4, "one")
    two = make_backend("two")
    added, = free_ports(1)
    write_config(cfg, {"a": ([port], [two.address]), "b": ([added], [two.address])})
    result = run_cli("reload", "-c", str(cfg), "--control", control, "--pin-dir", "")
    assert result.returncode == 0, result.stderr
    assert "reloaded to generation 2" in result.stdout and f"in {N} workers" in result.stdout
    for _ in range(20):  # spread over both workers' sockets on the new port
        assert greet(added) == "two"
        assert greet(port) == "two"

    cfg.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [port], "Targets": ["nope"]}]}))
    result = run_cli("reload", "-c", str(cfg), "--control", control, "--pin-dir", "")
    assert result.returncode == 1
    assert 'Apps[0].Targets[0]: "nope": not host:port' in result.stderr and str(cfg) in result.stderr
    assert status(control)["generation"] == 2
    assert greet(added) == "two"
    for s in held:  # connections from before both reloads still relay
        s.sendall(b"x\n")
        assert read_line(s) == b"x"
        s.close()


def test_sighup_reloads_every_worker(workers, make_backend):
    proxy, cfg, control, port = workers
    two = make_backend("two")
    write_config(cfg, {"a": ([port], [two.address])})
    msg = proxy.reload()
    assert "generation 2" in msg.get("STATUS", ""), msg
    assert all(greet(port) == "two" for _ in range(20))


def test_metrics_add_up_over_workers(tmp_path, start_proxy, make_backend):
    backend = make_backend("one")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    start_proxy(cfg, "--workers", str(N), "--metrics", f"127.0.0.1:{metrics_port}")
    conns = hold(port, 20, "one")
    text = scrape(metrics_port)
    assert sample(text, "flyproxy_connections_accepted_total", app="a") == 20
    assert sample(text, "flyproxy_connections_active", app="a") == 20
    assert sample(text, "flyproxy_workers") == N
    for s in conns:
        s.close()


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(workers):
    proxy, cfg, control, port = workers
    before = status(control)["workers"]
    victim = before[0]["pid"]
    survivor_conns = []
    for s in hold(port, 20, "one"):  # keep the connections the survivor holds
        survivor_conns.append(s)
    os.kill(victim, signal.SIGKILL)

    def replaced():
        st = status(control)
        pids = [w["pid"] for w in st["workers"]]
        return st if victim not in pids and all(w["ready"] for w in st["workers"]) else None

    st = wait_until(replaced, "the killed worker replaced")
    assert st["restarts"] == 1
    assert st["workers"][1]["pid"] == before[1]["pid"]  # the other one was left alone
    assert all(greet(port) == "one" for _ in range(20))
    live = [s for s in survivor_conns if not _dead(s)]
    assert live, "every connection was on the killed worker"
    for s in survivor_conns:
        s.close()


def _dead(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"x\n")
        return read_line(sock) != b"x"
    except OSError:
        return True


def test_sigterm_drains_every_worker_then_exits(workers):
    proxy, cfg, control, port = workers
    held = hold(port, 10, "one")
    pids = [w["pid"] for w in status(control)["workers"]]
    proxy.signal(signal.SIGTERM)
    proxy.notify.wait_for("STOPPING", "1")
    wait_until(lambda: _refused(port), "new connections refused")
    for s in held:  # open connections keep relaying during the drain, on every worker
        s.sendall(b"x\n")
        assert read_line(s) == b"x"
        s.shutdown(socket.SHUT_WR)
        assert read_line(s) == b"bye"
        s.close()
    assert proxy.wait() == 0
    assert not any(alive(pid) for pid in pids)


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return closed_by_peer(s)
    except ConnectionRefusedError:
        return True
    except TimeoutError:  # a SYN queued on a listener as it closed is dropped: try again
        return False


def test_workers_do_not_outlive_a_killed_supervisor(workers):
    proxy, cfg, control, port = workers
    pids = [w["pid"] for w in status(control)["workers"]]
    proxy.proc.kill()  # the supervisor only: SIGKILL cannot be passed on
    proxy.proc.wait(WAIT_S)
    wait_until(lambda: not any(alive(pid) for pid in pids), "workers exited")


def test_handed_in_socket_is_shared_by_the_workers(tmp_path, start_proxy, make_backend):
    backend = make_backend("one")
    port, = free_ports(1)
    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "control.sock")
    start_proxy(cfg, "--fd", str(listener.fileno()), "--workers", str(N), "--control", control,
                pass_fds=(listener.fileno(),), host=None)
    listener.close()  # the proxy's processes hold it now
    conns = hold(port, 20, "one")
    st = status(control)
    assert st["mode"] == "handed-in" and st["active"] == 20
    assert sum(w["active"] for w in st["workers"]) == 20
    for s in conns:
        s.close()


def test_app_limit_is_shared_between_workers(tmp_path, start_proxy, make_backend):
    backend = make_backend("one")
    port, = free_ports(1)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [port], "MaxConnections": 4,
                                         "Targets": [backend.address]}]}))
    start_proxy(cfg, "--workers", str(N))
    conns, served = [], 0
    for _ in range(12):
        try:
            s = connect(port)
        except ConnectionResetError:  # refused: a reset, here before connect() returned
            continue
        if not closed_by_peer(s):  # (refused: a reset at once; served: its greeting)
            served += 1
        conns.append(s)
    assert served == 4  # host-wide: counted over both workers, however the kernel spread them
    for s in conns:
        s.close()


def test_bad_worker_count_is_refused(tmp_path):
    cfg = write_config(tmp_path / "config.json", {"a": ([1], ["127.0.0.1:1"])})
    result = run_cli("serve", "-c", str(cfg), "--workers", "0")
    assert result.returncode == 2  # a usage error, as argparse reports every bad argument
    assert "argument --workers: 0: expected 1 to 64 or auto" in result.stderr


def test_a_port_in_use_stops_startup_with_the_workers_error(tmp_path, make_backend):
    backend = make_backend("one")
    with socket.create_server(("127.0.0.1", 0)) as busy:  # no SO_REUSEPORT: none may join
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
        result = run_cli("serve", "-c", str(cfg), "--host", "127.0.0.1", "--workers", str(N))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "exited with status 1 before it was ready" in result.stderr
    assert "no worker started; giving up" in result.stderr  # (none could: one would serve)


def test_a_replaced_worker_serves_the_config_in_force_not_a_broken_file(workers):
    """An edit not yet reloaded (here a broken one) must not reach a worker started to
    replace one that died: it gets the config the others serve."""
    proxy, cfg, control, port = workers
    good = cfg.read_bytes()
    cfg.write_text('{"Apps": [')  # broken, and never reloaded
    victim = status(control)["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced():
        st = status(control)
        return st if victim not in [w["pid"] for w in st["workers"]] and all(
            w["ready"] for w in st["workers"]) else None

    st = wait_until(replaced, "the killed worker replaced")
    assert st["restarts"] == 1 and st["digest"] != ""
    assert all(greet(port) == "one" for _ in range(20))  # both workers serve the old config
    cfg.write_bytes(good)


def test_a_hung_worker_is_replaced_and_its_share_of_connections_served(tmp_path, start_proxy,
                                                                        make_backend):
    """One of two workers is SIGSTOPped (hung, not dead): the supervisor's heartbeat finds
    it within seconds, kills and replaces it; new connections are served, status and
    metrics answer in full (before: half the connections hung, the worker was never
    replaced, and after SIGCONT every request read the previous one's reply)."""
    backend = make_backend("one")
    port, metrics_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "control.sock")
    proxy = start_proxy(cfg, "--control", control, "--workers", str(N),
                        "--metrics", f"127.0.0.1:{metrics_port}")
    hung = status(control)["workers"][0]["pid"]
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_until(lambda: hung not in [w["pid"] for w in status(control)["workers"]]
                   and all(w["ready"] for w in status(control)["workers"]),
                   "the hung worker replaced", timeout=20)
    finally:
        if alive(hung):
            os.kill(hung, signal.SIGCONT)
    assert status(control)["restarts"] == 1
    assert [greet(port) for _ in range(40)] == ["one"] * 40  # none reach a hung worker
    assert "did not answer 'ping' in 3s; killed" in proxy.output()
    text = scrape(metrics_port)
    assert sample(text, "flyproxy_workers") == N
    result = run_cli("reload", "-c", str(cfg), "--control", control, "--pin-dir", "")
    assert result.returncode == 0, result.stderr  # replies are not out of step


def test_a_late_reply_is_never_taken_for_the_next_one():
    """The supervisor's side of a channel: a worker answers a request after its deadline
    (the late reply carries the old id); the next request gets its own answer."""
    from appliance.service.workers import Worker, WorkerGone

    async def main():
        mine, theirs = socket.socketpair()
        w = Worker(0)
        w.attach(*await asyncio.open_connection(sock=mine))
        w.kill = lambda: None  # no process here: the channel alone is under test
        theirs.setblocking(False)
        loop = asyncio.get_running_loop()
        with pytest.raises(WorkerGone, match="did not answer 'status' in 0.2s"):
            await w.request("status", 0.2)  # nobody answers in time
        first = _json.loads(await loop.sock_recv(theirs, 1000))
        answer = asyncio.ensure_future(w.request("status", 5))
        second = _json.loads(await loop.sock_recv(theirs, 1000))
        assert second["id"] != first["id"]
        await loop.sock_sendall(theirs, _json.dumps({"ok": True, "id": first["id"],
                                                     "late": True}).encode() + b"\n")
        await loop.sock_sendall(theirs, _json.dumps({"ok": True, "id": second["id"]}).encode()
                                + b"\n")
        reply = await asyncio.wait_for(answer, 5)
        assert reply == {"ok": True, "id": second["id"]}
        w.close_channel()
        theirs.close()

    asyncio.run(main())


def test_a_reload_while_the_file_changes_leaves_every_worker_on_one_config(start_proxy, tmp_path,
                                                                            make_backend):
    """The supervisor reads the file once and sends those bytes to every worker (prepare,
    then commit): a file rewritten during reloads never splits the workers."""
    backend = make_backend("b")
    ports = free_ports(4)
    cfg = write_config(tmp_path / "config.json", {"a": (ports[:2], [backend.address])})
    control = str(tmp_path / "control.sock")
    start_proxy(cfg, "--workers", str(N), "--control", control)
    versions = [{"a": (ports[:2], [backend.address])}, {"a": (ports[2:], [backend.address])},
                {"a": (ports[1:3], [backend.address]), "b": ([ports[3]], [backend.address])}]
    stop = threading.Event()

    def rewrite() -> None:
        for i in range(2000):  # bounded; stopped once the reloads are done
            if stop.is_set():
                return
            write_config(cfg, versions[i % len(versions)])

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    try:
        for _ in range(15):
            run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
            reply = status(control)
            digests = {w["digest"] for w in reply["workers"]}
            assert digests == {reply["digest"]}, reply["workers"]
    finally:
        stop.set()
        writer.join(10)
    write_config(cfg, versions[2])
    out = run_cli("reload", "--control", control, "-c", str(cfg), "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    assert [greet(p) for p in ports[1:]] == ["b"] * 3
