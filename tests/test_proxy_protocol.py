"""PROXY protocol to backends ("ProxyProtocol": "v1" | "v2"), read by real receivers:
nginx stream (`listen ... proxy_protocol`) answering `$proxy_protocol_addr` and friends, and
HAProxy (`bind ... accept-proxy`) answering `%[src]`; per-port mode and BPF mode, IPv4,
IPv6 and a v4 client on a dual-stack listener. Each test runs in a network namespace of
its own (the dual-stack listener binds every address there, and only there)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from appliance.dataplane import proxy_protocol as pp
from helpers import WAIT_S, ProxyProcess, connect, free_ports, recv_all, run_cli, wait_until
from netns import NetNS
from steering import LISTEN_PORT, Steered

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces: needs root"),
    pytest.mark.skipif(not (shutil.which("nginx") and shutil.which("haproxy")),
                       reason="needs nginx and haproxy"),
]

NGINX_STREAM = "/usr/lib/nginx/modules/ngx_stream_module.so"
NGINX, HAPROXY = 7001, 7002  # the receivers, in the namespace (v1 and v2 alike)


# -- the format itself ---------------------------------------------------------------------

def test_v1_lines():
    assert pp.header("v1", ("192.0.2.1", 5000), ("198.51.100.7", 443)) == \
        b"PROXY TCP4 192.0.2.1 198.51.100.7 5000 443\r\n"
    assert pp.header("v1", ("2001:db8::1", 5000, 0, 0), ("::1", 80, 0, 0)) == \
        b"PROXY TCP6 2001:db8::1 ::1 5000 80\r\n"
    # a v4 client on a dual-stack listener: written as IPv4
    assert pp.header("v1", ("::ffff:127.0.0.5", 1, 0, 0), ("::ffff:127.0.0.1", 2, 0, 0)) == \
        b"PROXY TCP4 127.0.0.5 127.0.0.1 1 2\r\n"
    assert pp.header("v1", ("192.0.2.1", 1), ("::1", 2, 0, 0)) == b"PROXY UNKNOWN\r\n"
    assert pp.local("v1") == b"PROXY UNKNOWN\r\n"  # a health check's: no addresses


def test_v2_binary_layout():
    head = pp.header("v2", ("192.0.2.1", 5000), ("198.51.100.7", 443))
    assert head[:12] == b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
    assert head[12] == 0x21 and head[13] == 0x11  # version 2 PROXY; TCP over IPv4
    assert struct.unpack("!H", head[14:16]) == (12,) and len(head) == 16 + 12
    assert head[16:20] == ipaddress.ip_address("192.0.2.1").packed
    assert head[20:24] == ipaddress.ip_address("198.51.100.7").packed
    assert struct.unpack("!HH", head[24:28]) == (5000, 443)
    six = pp.header("v2", ("2001:db8::1", 5000, 0, 0), ("::1", 80, 0, 0))
    assert six[13] == 0x21 and struct.unpack("!H", six[14:16]) == (36,) and len(six) == 52
    mapped = pp.header("v2", ("::ffff:127.0.0.5", 1, 0, 0), ("::ffff:127.0.0.1", 2, 0, 0))
    assert mapped[13] == 0x11 and len(mapped) == 28
    # a health check's: version 2, command LOCAL, AF_UNSPEC, no addresses
    assert pp.local("v2") == pp.SIGNATURE + b"\x20\x00\x00\x00"


# -- real receivers ----------------------------------------------------------------------------

class Receivers:
    """nginx stream and HAProxy in ``ns``, each accepting the PROXY protocol (v1 and v2:
    both detect the version) and answering with the addresses the header carried."""

    def __init__(self, ns: NetNS, work: Path):
        self.ns = ns
        self.procs, self.work = [], work
        (work / "nginx.conf").write_text(f"""load_module {NGINX_STREAM};
daemon off;
master_process off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 64; }}
stream {{
    server {{
        listen 127.0.0.1:{NGINX} proxy_protocol;
        return "$proxy_protocol_addr $proxy_protocol_port $proxy_protocol_server_addr $proxy_protocol_server_port\\n";
    }}
}}
""")
        (work / "haproxy.cfg").write_text(f"""global
    maxconn 64
    log stderr format raw local0 info
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend receiver
    bind 127.0.0.1:{HAPROXY} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src] %[src_port] %[dst] %[dst_port] %[req.body]\\n"
""")
        for cmd in (["nginx", "-c", str(work / "nginx.conf")],
                    ["haproxy", "-db", "-f", str(work / "haproxy.cfg")]):
            log = open(work / f"{cmd[0]}.log", "w")
            self.procs.append(subprocess.Popen(ns.command(cmd), stdout=log,
                                               stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WAIT_S
        with ns.entered():
            for port in (NGINX, HAPROXY):
                while True:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                            s.sendall(b"PROXY UNKNOWN\r\n")  # not logged as a broken header
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"receiver on {port} did not start: see {work}")
                        time.sleep(0.05)  # waiting for another process to listen, bounded

    def errors(self) -> list[str]:
        """What the receivers logged about a PROXY header that did not come or did not parse."""
        text = (self.work / "nginx-error.log").read_text() + (self.work / "haproxy.log").read_text()
        return [line for line in text.splitlines()
                if "waiting for PROXY protocol header" in line or "broken header" in line]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait(WAIT_S)


def apps(receiver_ports=(NGINX, HAPROXY)) -> dict:
    """An app per receiver and version; their ports are 7101.. in the namespace."""
    doc, port = [], 7101
    for receiver in receiver_ports:
        for version in ("v1", "v2"):
            doc.append({"Name": f"r{receiver}-{version}", "Ports": [port],
                        "Targets": [f"127.0.0.1:{receiver}"], "ProxyProtocol": version})
            port += 1
    return {"Apps": doc}


def ask(ns: NetNS, app: dict, host: str, body: bytes = b"") -> tuple[list[str], tuple, tuple]:
    """Through the proxy to ``app``'s receiver: (what the receiver saw, the client's own
    address, the address it dialled)."""
    port = app["Ports"][0]
    with connect(port, host, namespace=ns.entered) as s:
        if app["Targets"][0].endswith(f":{HAPROXY}"):
            s.sendall(b"POST / HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            reply = recv_all(s).decode().rsplit("\r\n\r\n", 1)[-1]
        else:
            reply = recv_all(s).decode()
        return reply.split(), s.getsockname(), s.getpeername()


def plain(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip)


def assert_seen(seen: list[str], client: tuple, dialled: tuple) -> None:
    assert seen[:4] == [plain(client[0]), str(client[1]), plain(dialled[0]), str(dialled[1])]


@pytest.fixture
def receivers(tmp_path):
    ns = NetNS()
    receivers = None
    try:
        receivers = Receivers(ns, tmp_path)
        yield receivers
    finally:
        if receivers is not None:
            receivers.stop()
        ns.delete()


@pytest.fixture
def lab(receivers):
    return receivers.ns


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("listen", ["::", "127.0.0.1"])
def test_per_port_mode_sends_the_clients_address_to_nginx_and_haproxy(lab, tmp_path, listen):
    doc = apps()
    proxy = ProxyProcess(write(tmp_path / "config.json", doc), host=listen,
                         wrap=lab.command([]))
    try:
        hosts = ["127.0.0.1", "::1"] if listen == "::" else ["127.0.0.1"]
        for app in doc["Apps"]:
            for host in hosts:  # IPv6, and IPv4 on the dual-stack listener (v4-mapped)
                seen, client, dialled = ask(lab, app, host)
                assert_seen(seen, client, dialled)
    finally:
        proxy.stop()


def test_the_header_goes_before_every_byte_the_client_sent(lab, tmp_path):
    """The client sends at once, while the proxy is still connecting to the backend: the
    receiver (which parses the header first) still gets the body intact behind it."""
    doc = apps([HAPROXY])
    proxy = ProxyProcess(write(tmp_path / "config.json", doc), wrap=lab.command([]))
    try:
        body = b"x" * 3000
        for app in doc["Apps"]:
            seen, client, dialled = ask(lab, app, "127.0.0.1", body)
            assert_seen(seen, client, dialled)
            assert seen[4] == body.decode()
    finally:
        proxy.stop()


def test_byte_counts_are_the_clients_bytes_not_the_header(lab, tmp_path):
    doc = apps([HAPROXY])
    metrics_port = free_ports(1)[0]
    proxy = ProxyProcess(write(tmp_path / "config.json", doc), "--metrics",
                         f"127.0.0.1:{metrics_port}", wrap=lab.command([]))
    try:
        app = doc["Apps"][1]  # v2: the longer header
        request = b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello"
        with connect(app["Ports"][0], namespace=lab.entered) as s:
            s.sendall(request)
            assert b"hello" in recv_all(s)
        def bytes_in() -> float:  # (every app's series is there from the start, at 0)
            with lab.entered():
                with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as m:
                    m.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                    text = recv_all(m).decode()
            for line in text.splitlines():
                if (line.startswith("flyproxy_bytes_total{") and 'direction="in"' in line
                        and f'app="{app["Name"]}"' in line):
                    return float(line.rsplit(" ", 1)[1])
            return 0.0

        counted = wait_until(bytes_in, "the connection's bytes counted")
        assert counted == len(request)  # the client's, not the header's
    finally:
        proxy.stop()


def test_bpf_mode_sends_the_steered_port_not_the_listeners(tmp_path, bpffs):
    doc = apps()
    s = Steered(tmp_path, bpffs, doc)
    receivers = None
    try:
        receivers = Receivers(s.ns, tmp_path)
        s.load()
        s.start_proxy()
        s.register()
        for app in doc["Apps"]:
            for host in ("127.0.0.1", "::1"):
                seen, client, dialled = ask(s.ns, app, host)
                assert dialled[1] == app["Ports"][0] != LISTEN_PORT
                assert_seen(seen, client, dialled)
    finally:
        if receivers is not None:
            receivers.stop()
        s.close()


def checks(control: Path) -> list[dict]:
    result = run_cli("status", "--json", "--control", str(control))
    assert result.returncode == 0, result.stderr
    return [t["check"] for app in json.loads(result.stdout)["apps"] for t in app["targets"]]


def test_health_checks_send_a_header_the_receivers_accept(receivers, tmp_path):
    """A check connects and closes. To a target that expects the PROXY protocol it sends a
    LOCAL command (v2) or an UNKNOWN line (v1) first, as the spec asks of health checks: the
    receivers log no missing or broken header, and the target stays up."""
    doc = apps()
    for app in doc["Apps"]:
        app["HealthCheck"] = {"Interval": 0.1, "Timeout": 1, "Rise": 1, "Fall": 1}
    control = tmp_path / "control.sock"
    proxy = ProxyProcess(write(tmp_path / "config.json", doc), "--control", str(control),
                         wrap=receivers.ns.command([]))
    try:
        wait_until(lambda: min(c["checks"] for c in checks(control)) >= 5,
                   "five checks of every target")
        assert [(c["state"], c["error"]) for c in checks(control)] == [("up", "")] * 4
    finally:
        proxy.stop()
    assert receivers.errors() == []
    # ... and they would have: a bare connect and close is logged by both
    with receivers.ns.entered():
        for port in (NGINX, HAPROXY):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT_S).close()
    wait_until(lambda: len(receivers.errors()) >= 2, "the receivers to log a missing header")
