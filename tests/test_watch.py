"""`flyproxy serve --watch`: a changed config file is applied without a signal, however it
was replaced; a half-written or broken file never is (the old config keeps serving)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from appliance.service.watch import DEBOUNCE_S
from helpers import WAIT_S, connect, free_ports, greet, read_line, run_cli, wait_until, write_config


def greets(port: int) -> str:
    try:
        return greet(port)
    except OSError:
        return ""


def reloaded(proxy) -> str:
    """Wait for the reload a change set off to end (every worker's, with workers): the
    STATUS systemd was told with its READY=1."""
    proxy.notify.wait_for("RELOADING", "1")
    return proxy.notify.wait_for("READY", "1").get("STATUS", "")


def doc(apps: dict) -> str:
    return json.dumps({"Apps": [{"Name": n, "Ports": p, "Targets": t}
                                for n, (p, t) in apps.items()]})


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_rename_and_a_copy_then_move_are_applied(tmp_path, start_proxy, make_backend, workers):
    a, b, c = make_backend("a"), make_backend("b"), make_backend("c")
    pa, pb, pc = free_ports(3)
    config = write_config(tmp_path / "config.json", {"a": ([pa], [a.address])})
    proxy = start_proxy(config, "--watch", "--workers", workers)
    assert greets(pa) == "a"
    # an editor: write a temporary file, rename it over the config
    write_config(config, {"a": ([pa], [a.address]), "b": ([pb], [b.address])})
    assert "failed" not in reloaded(proxy)
    assert greets(pb) == "b"
    # cp + mv, from another directory's file
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "new.json").write_text(doc({"a": ([pa], [a.address]), "c": ([pc], [c.address])}))
    shutil.copy(staged / "new.json", tmp_path / "config.json.new")
    os.rename(tmp_path / "config.json.new", config)
    assert "failed" not in reloaded(proxy)
    assert greets(pc) == "c"
    assert greets(pb) == ""  # b's port was removed by it
    assert greets(pa) == "a"


def test_a_broken_file_is_logged_and_the_old_config_keeps_serving(tmp_path, start_proxy,
                                                                   make_backend):
    a, b = make_backend("a"), make_backend("b")
    pa, pb = free_ports(2)
    config = write_config(tmp_path / "config.json", {"a": ([pa], [a.address])})
    proxy = start_proxy(config, "--watch")
    config.write_text('{"Apps": [{"Name": "a", "Ports": [%d], "Targets": ["nowhere"]}]}' % pa)
    assert "reload failed" in reloaded(proxy)
    assert "Apps[0].Targets[0]" in proxy.output()  # where, and what (config.py's message)
    assert greets(pa) == "a"
    # the next change is tried afresh
    write_config(config, {"a": ([pa], [a.address]), "b": ([pb], [b.address])})
    assert "failed" not in reloaded(proxy)
    assert greets(pb) == "b"


def test_a_file_written_in_place_slowly_is_read_once_it_is_closed(tmp_path, start_proxy,
                                                                  make_backend):
    a, b = make_backend("a"), make_backend("b")
    pa, pb = free_ports(2)
    config = write_config(tmp_path / "config.json", {"a": ([pa], [a.address])})
    proxy = start_proxy(config, "--watch")
    text = doc({"a": ([pa], [a.address]), "b": ([pb], [b.address])})
    with open(config, "w") as f:  # truncates: the file is empty, then half written
        f.write(text[: len(text) // 2])
        f.flush()
        time.sleep(3 * DEBOUNCE_S)  # a slow writer (the condition under test, not a wait)
        f.write(text[len(text) // 2:])
    assert "failed" not in reloaded(proxy)  # the first reload is of the completed file
    assert greets(pb) == "b"
    assert "failed" not in proxy.output()  # the half-written file was never loaded


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_fifo_renamed_over_the_config_is_refused_and_nothing_freezes(tmp_path, start_proxy,
                                                                        make_backend, workers):
    a, b = make_backend("a"), make_backend("b")
    pa, pb = free_ports(2)
    config = write_config(tmp_path / "config.json", {"a": ([pa], [a.address])})
    control = str(tmp_path / "control.sock")
    proxy = start_proxy(config, "--watch", "--workers", workers, "--control", control)
    with connect(pa) as held:
        assert read_line(held) == b"a"
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        os.rename(fifo, config)  # nobody ever writes it: a read would wait forever
        assert "reload failed" in reloaded(proxy)
        assert f"{config}: not a regular file" in proxy.output()  # why it was refused
        assert [greets(pa) for _ in range(3)] == ["a"] * 3  # new connections
        held.sendall(b"still there\n")
        assert read_line(held) == b"still there"  # the established one
        status = run_cli("status", "--control", control, "--json", timeout=WAIT_S)
        assert status.returncode == 0 and json.loads(status.stdout)["generation"] == 1
    # and the watcher still watches: a regular file again is applied
    write_config(config, {"a": ([pa], [a.address]), "b": ([pb], [b.address])})
    assert "failed" not in reloaded(proxy)
    assert greets(pb) == "b"


def configmap_update(directory, text: str, version: str) -> None:
    """What the kubelet does to a mounted ConfigMap: the files in a new timestamped
    directory, a new ``..data`` symlink to it renamed over the old one, the old removed."""
    new = directory / f"..{version}"
    new.mkdir()
    (new / "config.json").write_text(text)
    old = os.readlink(directory / "..data") if os.path.lexists(directory / "..data") else None
    os.symlink(new.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")
    if old is not None:
        shutil.rmtree(directory / old)


def test_a_configmap_style_update_through_symlinks_is_applied(tmp_path, start_proxy,
                                                              make_backend):
    a, b = make_backend("a"), make_backend("b")
    pa, pb = free_ports(2)
    mount = tmp_path / "mount"
    mount.mkdir()
    configmap_update(mount, doc({"a": ([pa], [a.address])}), "2024_01_01_00_00_00.1")
    os.symlink("..data/config.json", mount / "config.json")
    proxy = start_proxy(mount / "config.json", "--watch")
    assert greets(pa) == "a"
    configmap_update(mount, doc({"a": ([pa], [a.address]), "b": ([pb], [b.address])}),
                     "2024_01_01_00_01_00.2")
    assert "failed" not in reloaded(proxy)
    assert greets(pb) == "b"
    configmap_update(mount, doc({"b": ([pb], [b.address])}), "2024_01_01_00_02_00.3")
    assert "failed" not in reloaded(proxy)  # and the next one (the new directory is watched)
    assert greets(pa) == ""
    log = proxy.output()  # what is watched: the link's directory and the one it leads to
    assert f"(in {mount}, {mount}/..2024_01_01_00_00_00.1;" in log
    assert f"now watching {mount}, {mount}/..2024_01_01_00_02_00.3" in log


def test_the_directory_removed_and_created_again_is_watched_again(tmp_path, start_proxy,
                                                                  make_backend):
    a, b = make_backend("a"), make_backend("b")
    pa, pb = free_ports(2)
    etc = tmp_path / "etc"
    etc.mkdir()
    config = write_config(etc / "config.json", {"a": ([pa], [a.address])})
    # (the test's notify socket and log live beside the first -c, the proxy reads the last)
    proxy = start_proxy(tmp_path / "unused.json", "-c", str(config), "--watch")
    shutil.rmtree(etc)
    wait_until(lambda: f"{etc} does not exist; watching {tmp_path} until"
               in proxy.output(), "the lost watch logged")
    etc.mkdir()
    write_config(config, {"a": ([pa], [a.address]), "b": ([pb], [b.address])})
    assert "failed" not in reloaded(proxy)
    assert greets(pb) == "b"
    wait_until(lambda: f"is back; watching {etc}" in proxy.output(), "the watch back, logged")
    assert greets(pa) == "a"  # the config in force kept serving while the file was gone
