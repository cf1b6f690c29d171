"""Hot reload on SIGHUP: ports come and go, targets change, open connections never notice."""

from __future__ import annotations

import json
import socket

import pytest

from helpers import connect, free_ports, greet, read_line, write_config


def echo_roundtrip(sock: socket.socket, text: bytes = b"still here\n") -> bytes:
    sock.sendall(text)
    return read_line(sock) + b"\n"


def test_reload_adds_removes_ports_and_changes_targets(tmp_path, start_proxy, make_backend):
    old, new = make_backend("old"), make_backend("new")
    kept, removed, added = free_ports(3)
    cfg = write_config(tmp_path / "config.json", {"a": ([kept, removed], [old.address])})
    proxy = start_proxy(cfg)

    # Long-lived connections on a kept port and on a port about to be removed.
    on_kept, on_removed = connect(kept), connect(removed)
    assert read_line(on_kept) == b"old" and read_line(on_removed) == b"old"

    write_config(cfg, {"a": ([kept, added], [new.address])})
    ready = proxy.reload()
    assert "generation 2" in ready["STATUS"]

    assert greet(kept) == "new"  # changed targets apply to new connections
    assert greet(added) == "new"  # the added port answers as soon as reload is done
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", removed), timeout=5)
    # Existing connections, including the one on the removed port, are untouched.
    assert echo_roundtrip(on_kept) == b"still here\n"
    assert echo_roundtrip(on_removed) == b"still here\n"
    on_kept.close()
    on_removed.close()
    assert "ports added" in proxy.output() and "targets changed: a" in proxy.output()


@pytest.mark.parametrize("breakage", ["invalid json", "schema", "port in use"])
def test_invalid_reload_keeps_the_old_config_serving(tmp_path, start_proxy, make_backend, breakage):
    backend = make_backend("old")
    port, other = free_ports(2)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [backend.address])})
    proxy = start_proxy(cfg)
    held = connect(port)
    assert read_line(held) == b"old"

    blocker = None
    if breakage == "invalid json":
        cfg.write_text('{"Apps": [')
        expected = "invalid JSON"
    elif breakage == "schema":
        cfg.write_text(json.dumps({"Apps": [{"Name": "a", "Ports": [port, 0], "Targets": ["x"]}]}))
        expected = "Apps[0].Ports[1]: must be from 1 to 65535, not 0"
    else:
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", other))
        blocker.listen(1)
        write_config(cfg, {"a": ([port, other], [backend.address])})
        expected = f"cannot listen on 127.0.0.1:{other}"
    try:
        ready = proxy.reload()
    finally:
        if blocker:
            blocker.close()
    assert ready["STATUS"].startswith("reload failed")
    assert "generation 1" in ready["STATUS"]
    assert expected in proxy.output()
    assert f"{cfg}" in proxy.output()  # the error names the file
    assert greet(port) == "old"
    assert echo_roundtrip(held) == b"still here\n"
    held.close()


def test_many_reloads_under_traffic_lose_nothing(tmp_path, start_proxy, make_backend):
    a, b = make_backend("a"), make_backend("b")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"app": ([port], [a.address])})
    proxy = start_proxy(cfg)
    held = connect(port)
    assert read_line(held) == b"a"
    seen = set()
    for i in range(10):
        write_config(cfg, {"app": ([port], [(a, b)[i % 2].address])})
        proxy.reload()
        seen.add(greet(port))
        assert echo_roundtrip(held) == b"still here\n"
    assert seen == {"a", "b"}
