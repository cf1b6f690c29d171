"""The control socket: `flyproxy reload` (synchronous) and `flyproxy status`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from helpers import (PYTHON, REPO, WAIT_S, connect, free_ports, greet, read_line, run_cli,
                     wait_until, write_config)


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
    assert 'Apps[0].Targets[0]: "nope": not host:port' in result.stderr and str(cfg) in result.stderr
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


def ask(control: str, payload: bytes) -> dict:
    """Send ``payload`` raw on the control socket; the one reply line, parsed."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(control)
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before taking all of it
        return json.loads(read_line(s))


@pytest.mark.parametrize("payload, error", [
    (b'{"command": "' + b"x" * (10 << 20) + b'"}\n', "request longer than 65536 bytes"),
    (b"[" * 60000 + b"]" * 60000 + b"\n", "request longer than 65536 bytes"),
    (b"[" * 30000 + b"]" * 30000 + b"\n", "expected a JSON line with a command"),
    (b'{"command": ["status"]}\n', "expected a JSON line with a command"),
], ids=["10-MB-line", "60k-deep", "30k-deep", "not-a-string"])
def test_a_hostile_request_gets_an_error_reply_and_the_proxy_serves_on(tmp_path, start_proxy,
                                                                       make_backend, payload,
                                                                       error):
    proxy, cfg, control, port = start(tmp_path, start_proxy, make_backend)
    assert ask(control, payload) == {"ok": False, "error": error}
    assert ask(control, b'{"command": "status"}\n')["ok"] is True
    assert greet(port) == "one"


def test_a_deeply_nested_config_fails_the_reload_with_a_reply_and_ready_again(
        tmp_path, start_proxy, make_backend):
    proxy, cfg, control, port = start(tmp_path, start_proxy, make_backend)
    cfg.write_text('{"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"], "X": '
                   + "[" * 970 + "]" * 970 + "}]}")
    assert ask(control, b'{"command": "reload"}\n')["ok"] is False  # answered, not dropped
    proxy.notify.wait_for("READY", "1")  # and systemd is told the reload is over
    assert "nested more than 16 levels deep" in proxy.output()
    assert "still serving generation 1" in proxy.output()
    assert greet(port) == "one"


def test_a_fifo_as_the_config_fails_the_reload_at_once(tmp_path, start_proxy, make_backend):
    proxy, cfg, control, port = start(tmp_path, start_proxy, make_backend)
    cfg.unlink()
    os.mkfifo(cfg)  # nobody writes it: reading it would wait forever
    proxy.reload()  # SIGHUP; READY=1 again (bounded wait)
    assert f"{cfg}: not a regular file" in proxy.output()
    assert greet(port) == "one"


def test_serve_refuses_to_remove_what_is_not_a_stale_socket_of_ours(tmp_path, start_proxy,
                                                                    make_backend):
    backend = make_backend("one")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    result = run_cli("serve", "-c", str(cfg), "--host", "127.0.0.1", "--control", str(precious))
    assert result.returncode == 1
    assert f"{precious} exists and is not a socket; not removing it" in result.stderr
    assert precious.read_text() == "keep me"
    control = str(tmp_path / "control.sock")
    start_proxy(cfg, "--control", control)
    other = write_config(tmp_path / "other.json", {"b": ([free_ports(1)[0]], [backend.address])})
    result = run_cli("serve", "-c", str(other), "--host", "127.0.0.1", "--control", control)
    assert result.returncode == 1 and "another proxy is serving on it" in result.stderr
    assert ask(control, b'{"command": "status"}\n')["ok"] is True  # the first one's socket
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # a socket nobody listens on: left by a run that died
    (tmp_path / "second").mkdir()
    start_proxy(write_config(tmp_path / "second" / "config.json",
                             {"c": ([free_ports(1)[0]], [backend.address])}),
                "--control", str(stale))  # replaced, and serving
    assert ask(str(stale), b'{"command": "status"}\n')["ok"] is True


def test_the_cli_waits_while_the_control_sockets_queue_is_full(tmp_path):
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(0)
    fillers = []
    try:
        while True:  # fill the accept queue: the next connect gets EAGAIN at once
            f = socket.socket(socket.AF_UNIX)
            f.setblocking(False)
            try:
                f.connect(path)
            except BlockingIOError:
                f.close()
                break
            fillers.append(f)
        cli = subprocess.Popen([PYTHON, "-m", "appliance", "status", "--json", "--control", path],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            cli.wait(1.0)  # it did not give up on the full queue
        server.settimeout(10)
        for _ in fillers:  # drain the queue; the CLI's connect goes through
            server.accept()[0].close()
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            assert json.loads(read_line(conn)) == {"command": "status"}
            conn.sendall(json.dumps({"ok": True, "generation": 7}).encode() + b"\n")
        out, err = cli.communicate(timeout=10)
        assert cli.returncode == 0, err
        assert json.loads(out)["generation"] == 7
    finally:
        for f in fillers:
            f.close()
        server.close()


def test_serve_and_status_find_each_other_by_default_and_the_socket_goes_at_exit(
        tmp_path, make_backend):
    """No --control on either side: both take $FLYPROXY_CONTROL (here the test's own; else
    /run/flyproxy/control.sock as root, $XDG_RUNTIME_DIR/flyproxy.sock otherwise)."""
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    path = tmp_path / "default.sock"
    env = {"FLYPROXY_CONTROL": str(path)}
    proxy = subprocess.Popen([PYTHON, "-m", "appliance", "serve", "-c", str(cfg), "--host",
                              "127.0.0.1"], cwd=REPO, env={**os.environ, **env},
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: run_cli("status", env=env).returncode == 0, "status answers")
        assert path.exists()
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(WAIT_S) == 0
        assert not path.exists()  # removed at a clean stop
    finally:
        proxy.kill()
        proxy.wait(WAIT_S)


def test_a_control_socket_in_a_missing_directory_is_a_clean_error(tmp_path, make_backend):
    backend = make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    out = run_cli("serve", "-c", str(cfg), "--host", "127.0.0.1", "--control",
                  str(tmp_path / "missing" / "c.sock"), timeout=30)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert f"the directory {tmp_path / 'missing'} does not exist" in out.stderr


def test_reload_refuses_a_file_the_proxy_does_not_serve(tmp_path, start_proxy, make_backend):
    backend = make_backend("b")
    port, other_port = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    other = write_config(tmp_path / "other.json", {"a": ([other_port], [backend.address])})
    control = str(tmp_path / "c.sock")
    start_proxy(cfg, "--control", control)
    out = run_cli("reload", "--control", control, "-c", str(other), "--pin-dir", "")
    assert out.returncode == 2
    assert f"the proxy serves {cfg}, not {other}" in out.stderr
    with pytest.raises(ConnectionRefusedError):
        connect(other_port).close()
    # without -c: the file the proxy serves
    write_config(cfg, {"a": ([port, other_port], [backend.address])})
    out = run_cli("reload", "--control", control, "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    assert greet(other_port) == "b"


def test_status_in_a_pipe_that_closes_early_says_nothing_more(tmp_path, start_proxy,
                                                              make_backend):
    backend = make_backend("b")
    ports = free_ports(40)
    cfg = write_config(tmp_path / "config.json",
                       {f"app{i}": ([p], [backend.address]) for i, p in enumerate(ports)})
    control = str(tmp_path / "c.sock")
    start_proxy(cfg, "--control", control)
    for flags in ([], ["--json"]):
        out = subprocess.run(f"{PYTHON} -m appliance status --control {control} "
                             f"{' '.join(flags)} | head -1", shell=True, cwd=REPO,
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.stdout.count("\n") == 1
        assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr


def test_status_counts_in_words_and_says_when_the_file_differs(tmp_path, start_proxy,
                                                               make_backend):
    backend = make_backend("b")
    port, other = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "c.sock")
    proxy = start_proxy(cfg, "--control", control)
    assert "serving 1 app, 1 port, 1 target on 1 port" in proxy.output()  # (not "1 apps")
    out = run_cli("status", "--control", control, "--log-level", "debug")  # (after it, too)
    assert out.returncode == 0, out.stderr
    assert "1 active connection" not in out.stdout and "0 active connections" in out.stdout
    assert "differs" not in out.stdout
    write_config(cfg, {"a": ([port, other], [backend.address])})
    out = run_cli("status", "--control", control)
    assert f"{cfg} on disk differs from the config in force" in out.stdout
    run_cli("reload", "--control", control, "--pin-dir", "")
    assert "differs" not in run_cli("status", "--control", control).stdout


def test_reload_says_when_it_found_no_steering_state_to_sync(tmp_path, start_proxy,
                                                             make_backend):
    """A handed-in proxy relies on the BPF port map: a reload that finds no pinned state
    where it looks says so (a per-port proxy binds its ports itself: nothing to say)."""
    backend = make_backend("b")
    port, listen = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    control = str(tmp_path / "c.sock")
    start_proxy(cfg, "--control", control, "--listen", f"127.0.0.1:{listen}", host=None)
    missing = tmp_path / "no-pins"
    out = run_cli("reload", "--control", control, "--pin-dir", str(missing))
    assert out.returncode == 0, out.stderr
    assert f"no BPF steering state at {missing}" in out.stderr
    (tmp_path / "pp").mkdir()  # (a proxy's notify socket lives beside its config)
    per_port = write_config(tmp_path / "pp" / "config.json",
                            {"a": ([free_ports(1)[0]], [backend.address])})
    start_proxy(per_port, "--control", str(tmp_path / "pp.sock"))
    out = run_cli("reload", "--control", str(tmp_path / "pp.sock"), "--pin-dir", str(missing))
    assert out.returncode == 0 and "steering" not in out.stderr, out.stderr


def test_a_command_that_fails_inside_is_answered_with_an_error_not_silence():
    """A bug in a command's handler is answered (a supervisor waiting on a silent worker
    would kill it, and with it every connection it holds)."""
    import asyncio

    from appliance.service import control

    class Broken:
        async def handle_command(self, command: str) -> dict:
            raise OSError(9, "Bad file descriptor")

    reply = json.loads(asyncio.run(control._answer(Broken(), b'{"command": "status", "id": 7}\n')))
    assert reply == {"ok": False, "error": "internal error: OSError(9, 'Bad file descriptor')",
                     "id": 7}
