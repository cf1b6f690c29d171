"""The access log: a line per connection as it ends (at info, by default), and one every
--conn-log-interval while it lasts."""

from __future__ import annotations

import re
import socket
import struct
from pathlib import Path

from helpers import (closed_by_peer, connect, dead_port, free_ports, greet, read_line, recv_all,
                     wait_until, write_config)

LINE = re.compile(r"(?P<level>[A-Z]+) appliance\.connections: (?P<text>conn=.*)")


def access_lines(proxy, conn: str = "closed") -> list[dict]:
    """The access log's lines of one kind, each as its level and key=value pairs."""
    rows = []
    for match in LINE.finditer(proxy.output()):
        fields = dict(pair.split("=", 1) for pair in match["text"].split())
        if fields["conn"] == conn:
            rows.append({"level": match["level"], **fields})
    return rows


def talk(port: int, host: str = "127.0.0.1") -> str:
    """One short exchange through the proxy; returns the client's own ip:port."""
    with connect(port, host) as s:
        me = s.getsockname()
        s.sendall(b"abc\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"live\nabc\nbye\n"
    return f"[{me[0]}]:{me[1]}" if ":" in me[0] else f"{me[0]}:{me[1]}"


def test_every_connection_gets_a_line_at_info_by_default(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    proxy = start_proxy(cfg)  # no --conn-log-level: the default
    client = talk(port)
    line, = wait_until(lambda: access_lines(proxy), "the connection's access log line")
    secs = line.pop("secs")
    assert float(secs) >= 0
    assert line == {"level": "INFO", "conn": "closed", "client": client, "app": "a",
                    "port": str(port), "target": live.address, "in": "4", "out": "13",
                    "end": "closed", "attempts": "1", "pid": str(proxy.pid)}


def test_ipv4_clients_of_a_dual_stack_listener_are_shown_as_ipv4(tmp_path, start_proxy,
                                                                 make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    proxy = start_proxy(cfg, host=None)  # every address: one [::] socket, IPv4 mapped
    v4, v6 = talk(port, "127.0.0.1"), talk(port, "::1")
    lines = wait_until(lambda: len(access_lines(proxy)) == 2 and access_lines(proxy),
                       "two access log lines")
    assert sorted(line["client"] for line in lines) == sorted([v4, v6])
    assert v4.startswith("127.0.0.1:") and v6.startswith("[::1]:")


def test_a_long_connection_gets_a_line_every_interval_with_its_bytes_so_far(
        tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    proxy = start_proxy(cfg, "--conn-log-interval", "0.2")
    with connect(port) as s:
        me = "%s:%d" % s.getsockname()[:2]
        assert read_line(s) == b"live"
        s.sendall(b"tick\n")
        assert read_line(s) == b"tick"
        first = wait_until(lambda: access_lines(proxy, "open"), "a line while it lasts")[0]
        assert first["client"] == me and first["app"] == "a" and first["pid"] == str(proxy.pid)
        assert (first["in"], first["out"]) == ("5", "10")  # "tick\n"; "live\n" + "tick\n"
        s.sendall(b"tock\n")
        assert read_line(s) == b"tock"
        wait_until(lambda: any(line["in"] == "10" for line in access_lines(proxy, "open")),
                   "a later line with the bytes since")
        assert not access_lines(proxy)  # not closed yet
    wait_until(lambda: access_lines(proxy), "the closing line")


def test_the_access_log_can_be_turned_off(tmp_path, start_proxy, make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    proxy = start_proxy(cfg, "--conn-log-level", "off", "--conn-log-interval", "0.1",
                        "--idle-timeout", "0.4")
    with connect(port) as s:
        assert read_line(s) == b"live"
        assert closed_by_peer(s)  # by the sweep, idle: it lived past several intervals
    proxy.reload()  # a round trip through the proxy's loop after the close
    assert "appliance.connections" not in proxy.output()


def test_with_workers_each_line_names_the_worker_that_relayed_it(tmp_path, start_proxy,
                                                                 make_backend):
    live = make_backend("live")
    port, = free_ports(1)
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address])})
    proxy = start_proxy(cfg, "--workers", "2")
    talk(port)
    line, = wait_until(lambda: access_lines(proxy), "the connection's access log line")
    stat = Path(f"/proc/{line['pid']}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[1]) == proxy.pid  # a worker: the proxy's child


def test_a_sample_of_clean_ends_is_logged_and_every_other_end(tmp_path, start_proxy,
                                                              make_backend):
    live = make_backend("live")
    port, down_port = free_ports(2)
    dead = f"127.0.0.1:{dead_port()}"
    cfg = write_config(tmp_path / "config.json", {"a": ([port], [live.address]),
                                                  "down": ([down_port], [dead])})
    proxy = start_proxy(cfg, "--conn-log-sample", "3")
    for _ in range(6):
        talk(port)
    assert greet(down_port) == ""  # all targets down: closed, and logged
    with connect(port) as s:  # the client resets: logged
        assert read_line(s) == b"live"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: {"all-targets-down", "client-reset"}
               <= {line["end"] for line in access_lines(proxy)}, "the two failures' lines")
    proxy.reload()  # a round trip through the proxy's loop: every close is logged by now
    ends = sorted(line["end"] for line in access_lines(proxy))
    assert ends == ["all-targets-down", "client-reset", "closed", "closed"], proxy.output()
