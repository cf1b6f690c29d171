"""Host-name targets against a real DNS server: answers are kept by TTL and never looked up
per connection; a slow, failing or lying resolver costs a connection nothing while another
target has addresses.

Each test runs the proxy in a network namespace of its own (``ip netns exec``), whose
/etc/resolv.conf points at :class:`dns_server.DnsServer` on 127.0.0.1:53 there and whose
/etc/hosts is the test's own: nothing here asks the host's resolver.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from dns_server import DnsServer
from helpers import (REPO, ProxyProcess, TaggedBackend, connect, read_line, run_cli,
                     wait_until, write_config)
from netns import NetNS

pytestmark = pytest.mark.root

HOSTS = "127.0.0.1 localhost\n::1 localhost\n127.0.0.1 pinned.test\n"


class Lab:
    """A namespace with a DNS server, backends and proxies inside it."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.ns = NetNS("flyproxy-dns")
        self.ns.etc(resolv_conf="nameserver 127.0.0.1\n", hosts=HOSTS)
        self.dns = DnsServer(namespace=self.ns.entered)
        self.backends: list[TaggedBackend] = []
        self.proxies: list[ProxyProcess] = []
        self.control = str(tmp_path / "control.sock")

    def backend(self, tag: str, host: str = "127.0.0.1", port: int = 0) -> TaggedBackend:
        with self.ns.entered():
            if ":" in host:
                server = _V6Backend(tag, port, host)
            else:
                server = TaggedBackend(tag, port, host)
        self.backends.append(server)
        return server

    def proxy(self, apps: dict, *args: str) -> ProxyProcess:
        cfg = write_config(self.tmp_path / "config.json", apps)
        return self.serve(cfg, *args)

    def serve(self, cfg: Path, *args: str) -> ProxyProcess:
        proxy = ProxyProcess(cfg, "--control", self.control, *args, wrap=self.ns.command([]))
        self.proxies.append(proxy)
        return proxy

    def greet(self, port: int, timeout: float = 10) -> str:
        with connect(port, timeout=timeout, namespace=self.ns.entered) as s:
            return read_line(s).decode()

    def status(self) -> dict:
        out = run_cli("status", "--control", self.control, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def name(self, host: str) -> dict:
        return next(n for n in self.status()["names"] if n["name"] == host)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for server in self.backends:
            server.stop()
        self.dns.stop()
        self.ns.delete()


class _V6Backend(TaggedBackend):
    address_family = socket.AF_INET6


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def test_a_slow_name_never_delays_a_connection_another_target_can_serve(lab):
    """The resolver takes 8 s for bad.target.for.testing and answers good.test at once:
    60 clients connecting at once are all served within the connect timeout (with
    per-connection lookups in a thread pool, 57 of 60 were closed)."""
    live = lab.backend("live")
    lab.dns.set("good.test", ("A", "127.0.0.1", 300))
    lab.dns.delay_s["bad.target.for.testing"] = 8.0
    proxy = lab.proxy({"a": ([7000], ["bad.target.for.testing:6003", f"good.test:{live.port}"])},
                      "--connect-timeout", "3")

    def client(_: int) -> str:
        return lab.greet(7000, timeout=3)  # the connect timeout bounds each client

    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        tags = list(pool.map(client, range(60)))
    assert tags == ["live"] * 60
    assert lab.name("bad.target.for.testing")["state"] in ("pending", "down")
    assert "after 2 attempts" not in proxy.output()  # the slow name was never waited on


def test_an_unresolvable_name_costs_no_connect_attempt_and_no_lookup_per_connection(lab):
    live = lab.backend("live")
    lab.dns.set("good.test", ("A", "127.0.0.1", 300))
    metrics_port = 9464
    proxy = lab.proxy({"a": ([7000], ["bad.target.for.testing:6003", f"good.test:{live.port}"])},
                      "--dns-negative-ttl", "60", "--metrics", f"127.0.0.1:{metrics_port}")
    asked = lab.dns.asked("bad.target.for.testing")
    assert asked >= 2  # A and AAAA, once, at startup
    assert [lab.greet(7000) for _ in range(30)] == ["live"] * 30
    assert lab.dns.asked("bad.target.for.testing") == asked  # no lookup per connection
    assert "attempts=2" not in proxy.output()  # and never a failed attempt first
    name = lab.name("bad.target.for.testing")
    assert (name["state"], name["error"], name["addresses"]) == ("down", "nxdomain", [])
    good = lab.name("good.test")
    assert (good["state"], good["addresses"], good["source"]) == ("fresh", ["127.0.0.1"], "dns")
    with lab.ns.entered():
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    assert 'flyproxy_dns_lookups_total{result="nxdomain"} 1.0' in text
    assert 'flyproxy_dns_lookups_total{result="ok"} 1.0' in text
    assert 'flyproxy_dns_state{name="bad.target.for.testing",state="down"} 1.0' in text
    assert 'flyproxy_dns_addresses{name="good.test"} 1.0' in text
    assert 'flyproxy_dns_answer_age_seconds{name="good.test"}' in text


def test_a_changed_answer_is_used_within_its_ttl_and_open_connections_stay(lab):
    new = lab.backend("new", "127.0.0.3")
    new_port = new.port
    lab.backend("old", "127.0.0.2", new_port)  # the same port on both addresses
    lab.dns.set("moving.test", ("A", "127.0.0.2", 1))
    proxy = lab.proxy({"a": ([7000], [f"moving.test:{new_port}"])})
    held = connect(7000, namespace=lab.ns.entered)
    assert read_line(held) == b"old"
    lab.dns.set("moving.test", ("A", "127.0.0.3", 1))
    wait_until(lambda: lab.greet(7000) == "new", "new connections reach the moved backend")
    held.sendall(b"still here\n")
    assert read_line(held) == b"still here"  # the open connection was not touched
    held.close()
    assert "moving.test: addresses changed: 127.0.0.2 -> 127.0.0.3" in proxy.output()


def test_a_failing_resolver_serves_stale_answers_then_the_name_goes_down(lab):
    live = lab.backend("live")
    lab.dns.set("flaky.test", ("A", "127.0.0.1", 1))
    lab.proxy({"a": ([7000], [f"flaky.test:{live.port}"])}, "--dns-stale", "6",
              "--dns-timeout", "0.3")
    assert lab.greet(7000) == "live"
    lab.dns.silent = True  # the resolver stops answering
    wait_until(lambda: (lab.name("flaky.test")["state"], lab.name("flaky.test")["error"]) ==
               ("stale", "timeout"), "the answer goes stale: the lookup timed out")
    assert lab.greet(7000) == "live"  # stale addresses keep serving
    wait_until(lambda: lab.name("flaky.test")["state"] == "down",
               "the name goes down after --dns-stale", timeout=15)
    assert lab.greet(7000) == ""  # its only target has no address: closed at once
    lab.dns.silent = False  # back: the retries (with backoff) find it again
    wait_until(lambda: lab.name("flaky.test")["state"] == "fresh", "the name comes back",
               timeout=40)
    assert lab.greet(7000) == "live"


def test_servfail_keeps_the_last_good_addresses(lab):
    live = lab.backend("live")
    lab.dns.set("shaky.test", ("A", "127.0.0.1", 1))
    lab.proxy({"a": ([7000], [f"shaky.test:{live.port}"])})
    lab.dns.servfail.add("shaky.test")
    wait_until(lambda: lab.name("shaky.test")["error"] == "servfail or unreachable",
               "a SERVFAIL is seen")
    assert lab.name("shaky.test")["addresses"] == ["127.0.0.1"]
    assert lab.greet(7000) == "live"


def test_names_in_etc_hosts_resolve_as_getaddrinfo_does_and_never_reach_dns(lab):
    live = lab.backend("live")
    lab.proxy({"a": ([7000], [f"pinned.test:{live.port}"]), "b": ([7001], [f"localhost:{live.port}"])})
    assert lab.greet(7000) == "live"
    assert lab.greet(7001) == "live"  # ::1 refuses, then 127.0.0.1 answers (getaddrinfo's order)
    assert lab.dns.asked("pinned.test") == 0 and lab.dns.asked("localhost") == 0
    pinned, localhost = lab.name("pinned.test"), lab.name("localhost")
    assert (pinned["source"], pinned["addresses"]) == ("hosts", ["127.0.0.1"])
    assert sorted(localhost["addresses"]) == ["127.0.0.1", "::1"]


def test_an_aaaa_only_name(lab):
    live = lab.backend("v6", "::1")
    lab.dns.set("six.test", ("AAAA", "::1", 300))
    lab.proxy({"a": ([7000], [f"six.test:{live.port}"])})
    assert lab.greet(7000) == "v6"
    assert lab.name("six.test")["addresses"] == ["::1"]


def test_a_reload_resolves_added_names_before_it_returns(lab):
    live = lab.backend("live")
    lab.dns.set("first.test", ("A", "127.0.0.1", 300))
    lab.dns.set("added.test", ("A", "127.0.0.1", 300))
    lab.dns.delay_s["slow.test"] = 30.0
    proxy = lab.proxy({"a": ([7000], [f"first.test:{live.port}"])}, "--connect-timeout", "2")
    write_config(proxy.config, {"a": ([7000], [f"first.test:{live.port}"]),
                                "b": ([7001], [f"added.test:{live.port}"]),
                                "c": ([7002], [f"slow.test:{live.port}"])})
    out = run_cli("reload", "--control", lab.control, "-c", str(proxy.config), "--pin-dir", "",
                  timeout=15)  # bounded: a name that does not answer does not hold it up
    assert out.returncode == 0, out.stderr
    names = {n["name"]: n["state"] for n in lab.status()["names"]}
    assert names == {"first.test": "fresh", "added.test": "fresh", "slow.test": "pending"}
    assert lab.greet(7001) == "live"  # answered before the reload returned
    write_config(proxy.config, {"b": ([7001], [f"added.test:{live.port}"])})
    out = run_cli("reload", "--control", lab.control, "-c", str(proxy.config), "--pin-dir", "")
    assert out.returncode == 0, out.stderr
    assert {n["name"] for n in lab.status()["names"]} == {"added.test"}  # the others forgotten


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_reload_in_flight_when_sigterm_arrives_opens_no_port(lab, workers):
    """SIGTERM while a reload waits on DNS: the reload is refused, its new port never
    listens on the draining proxy (a restarted one could not bind it), the old
    connections drain as usual."""
    live = lab.backend("live")
    lab.dns.set("first.test", ("A", "127.0.0.1", 300))
    lab.dns.delay_s["slow.test"] = 30.0
    proxy = lab.proxy({"a": ([7000], [f"first.test:{live.port}"])}, "--connect-timeout", "3",
                      "--grace-period", "30", "--workers", workers)
    held = connect(7000, namespace=lab.ns.entered)
    assert read_line(held) == b"live"
    write_config(proxy.config, {"a": ([7000], [f"first.test:{live.port}"]),
                                "c": ([7002], [f"slow.test:{live.port}"])})
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reload = pool.submit(run_cli, "reload", "--control", lab.control, "--pin-dir", "",
                             "-c", str(proxy.config),
                             timeout=30)
        wait_until(lambda: lab.dns.queries[("slow.test", "A")], "the reload resolving slow.test")
        proxy.signal(signal.SIGTERM)
        out = reload.result(timeout=40)
    assert out.returncode != 0 and "stopping" in out.stdout + out.stderr, (out.stdout, out.stderr)
    with pytest.raises(ConnectionRefusedError):
        connect(7002, namespace=lab.ns.entered, timeout=5).close()
    held.sendall(b"draining\n")  # the old connection is still served while it drains
    assert read_line(held) == b"draining"
    held.close()
    assert proxy.wait(timeout=30) == 0


def test_no_thread_is_started_to_resolve_names(lab):
    """c-ares runs on the event loop: the proxy stays one thread however many lookups."""
    live = lab.backend("live")
    lab.dns.set("good.test", ("A", "127.0.0.1", 1))
    proxy = lab.proxy({"a": ([7000], [f"good.test:{live.port}", "bad.target.for.testing:1"])})
    for _ in range(20):
        assert lab.greet(7000) == "live"
    wait_until(lambda: lab.dns.asked("good.test") >= 4, "a refresh after the 1 s TTL")
    assert len(list(Path(f"/proc/{proxy.pid}/task").iterdir())) == 1


def test_the_challenge_config_verbatim_with_its_names_answered_by_dns(lab):
    """The challenge's own config.json, unchanged: tcp-echo.fly.dev answered by our DNS
    server (127.0.0.2 here, where echo backends listen on its ports), and
    bad.target.for.testing, which never resolves, routed around without a failed attempt."""
    mission = json.loads((REPO / "config.json").read_text())
    cfg = lab.tmp_path / "config.json"
    shutil.copy(REPO / "config.json", cfg)
    lab.dns.set("tcp-echo.fly.dev", ("A", "127.0.0.2", 60))
    for app in mission["Apps"]:
        for target in app["Targets"]:
            host, port = target.rsplit(":", 1)
            if host == "tcp-echo.fly.dev":
                lab.backend(f"{app['Name']}:{port}", "127.0.0.2", int(port))
    proxy = lab.serve(cfg, "--workers", "2")
    for app in mission["Apps"]:
        for port in app["Ports"]:
            for _ in range(3):
                assert lab.greet(port).startswith(app["Name"] + ":"), port
    assert "attempts=2" not in proxy.output()
    names = {n["name"]: n["state"] for n in lab.status()["names"]}
    assert names == {"tcp-echo.fly.dev": "fresh", "bad.target.for.testing": "down"}


def test_a_black_holed_address_does_not_fail_a_name_that_has_a_working_one(lab):
    """dual.test has ::1, where SYNs are dropped, and 127.0.0.1, which answers: Happy
    Eyeballs starts 127.0.0.1 250 ms into the ::1 attempt and it wins; the target never
    fails (before, the one timeout covered the whole target: 3 of 3 connections failed)."""
    live = lab.backend("v4")
    with lab.ns.entered():
        silent = socket.socket(socket.AF_INET6)
        silent.bind(("::1", live.port))
        silent.listen(0)
        fillers = []
        for _ in range(4):  # fill its accept queue: further SYNs to [::1]:port are dropped
            f = socket.socket(socket.AF_INET6)
            f.setblocking(False)
            f.connect_ex(("::1", live.port))
            fillers.append(f)
    try:
        lab.dns.set("dual.test", ("AAAA", "::1", 300), ("A", "127.0.0.1", 300))
        proxy = lab.proxy({"a": ([7000], [f"dual.test:{live.port}"])}, "--connect-timeout", "3")
        assert [lab.greet(7000, timeout=3) for _ in range(3)] == ["v4"] * 3
        assert "attempts=2" not in proxy.output() and "targets failed" not in proxy.output()
        assert lab.name("dual.test")["addresses"] == ["::1", "127.0.0.1"]
    finally:
        for f in fillers:
            f.close()
        silent.close()


@pytest.mark.parametrize("failure", ["servfail", "silent"])
def test_a_family_whose_query_fails_keeps_its_last_good_addresses(lab, failure):
    """dual.test has ::1 (nothing listens there: refused) and 127.0.0.1 (the backend).
    Its A query starts failing (SERVFAIL, or no answer at all) while AAAA still answers:
    127.0.0.1 stays, stale once its TTL is over (before, the name became [::1] alone, shown
    fresh, and every connection failed). Only an answer with no A record removes it."""
    live = lab.backend("v4")
    lab.dns.set("dual.test", ("AAAA", "::1", 1), ("A", "127.0.0.1", 1))
    proxy = lab.proxy({"a": ([7000], [f"dual.test:{live.port}"])}, "--dns-timeout", "0.3",
                      "--dns-stale", "120")
    assert lab.greet(7000) == "v4"
    lab.dns.broken[("dual.test", "A")] = failure
    reason = "servfail or unreachable" if failure == "servfail" else "timeout"
    name = wait_until(lambda: (lambda n: n if n["error"] or len(n["addresses"]) != 2 else None)(
        lab.name("dual.test")), "a refresh whose A query failed")
    assert (name["addresses"], name["error"]) == (["::1", "127.0.0.1"], f"A: {reason}")
    wait_until(lambda: lab.name("dual.test")["state"] == "stale", "stale once its TTL is over")
    assert [lab.greet(7000) for _ in range(20)] == ["v4"] * 20
    assert lab.name("dual.test")["addresses"] == ["::1", "127.0.0.1"]
    assert f"dual.test: lookup failed (A: {reason}); still using 127.0.0.1 for up to" \
        in proxy.output()
    del lab.dns.broken[("dual.test", "A")]
    wait_until(lambda: (lab.name("dual.test")["state"], lab.name("dual.test")["error"]) ==
               ("fresh", ""), "fresh again once A answers")
    lab.dns.set("dual.test", ("AAAA", "::1", 1))  # NODATA for A: IPv4 is gone
    wait_until(lambda: lab.name("dual.test")["addresses"] == ["::1"],
               "an authoritative empty A answer removes the IPv4 address")
    assert lab.name("dual.test")["state"] == "fresh"


def test_a_family_failing_past_dns_stale_is_dropped_and_the_other_kept(lab):
    """--dns-stale holds per family: the A answer goes after 1 s of failures past its TTL,
    logged as such, while the AAAA answer, still answered, keeps the name serving."""
    live = lab.backend("v6", "::1")
    lab.dns.set("dual.test", ("AAAA", "::1", 1), ("A", "127.0.0.1", 1))
    proxy = lab.proxy({"a": ([7000], [f"dual.test:{live.port}"])}, "--dns-stale", "1")
    assert lab.name("dual.test")["addresses"] == ["::1", "127.0.0.1"]
    lab.dns.broken[("dual.test", "A")] = "servfail"
    wait_until(lambda: "dual.test: A addresses down (A: servfail or unreachable); stopped "
               "using 127.0.0.1" in proxy.output(), "the A answer given up after --dns-stale",
               timeout=15)
    name = lab.name("dual.test")
    assert (name["state"], name["addresses"], name["error"]) == \
        ("fresh", ["::1"], "A: servfail or unreachable")
    assert lab.greet(7000) == "v6"


def test_every_one_of_a_thousand_a_records_is_kept(lab):
    """many.test has 1,000 A records (an answer only TCP carries): 999 addresses in
    127.0.0.0/8 where nothing listens, then the backend's. All are kept (pycares kept the
    first 256, and the backend's address was not among them: 0 of 10 connected); a
    refused address costs one failed connect, so each client gets through the 999 to the
    live one within the connect timeout."""
    live = lab.backend("live")
    dead = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(999)]
    lab.dns.set("many.test", *[("A", ip, 300) for ip in dead], ("A", "127.0.0.1", 300))
    proxy = lab.proxy({"a": ([7000], [f"many.test:{live.port}"])})
    assert [lab.greet(7000) for _ in range(10)] == ["live"] * 10
    name = lab.name("many.test")
    assert name["addresses"] == dead + ["127.0.0.1"]
    assert lab.dns.tcp_queries >= 1  # truncated over UDP, asked again over TCP
    assert " and 992 more (dns, ttl 300s)" in proxy.output()  # 8 named in the log line


def test_a_name_whose_refresh_is_in_flight_is_refreshing_not_stale(lab):
    """A refresh that has not answered yet is no failure: past its TTL the name shows
    "refreshing" (it showed "stale", as if the resolver had failed), then "fresh"."""
    live = lab.backend("live")
    lab.dns.set("slow.test", ("A", "127.0.0.1", 1))
    lab.proxy({"a": ([7000], [f"slow.test:{live.port}"])}, "--dns-timeout", "5")
    assert lab.name("slow.test")["state"] == "fresh"
    lab.dns.delay_s["slow.test"] = 3.0  # the next answers come 3 s late, within the timeout
    name = wait_until(lambda: (lambda n: n if n["state"] != "fresh" else None)(
        lab.name("slow.test")), "the answer's TTL runs out while its refresh is out")
    assert (name["state"], name["error"]) == ("refreshing", "")
    wait_until(lambda: lab.dns.asked("slow.test") >= 4 and
               lab.name("slow.test")["state"] == "fresh", "the late answer makes it fresh")
    assert lab.greet(7000) == "live"
