"""A fleet of appliances behind one address, as an anycast edge is: the lab of tests/fleet.

    client ns            router ns                         containers (booted Debian 12)
    10.98.0.2 --veth-- 10.98.0.1                    --veth-- 10.97.1.2  fleet1  lo: VIP
                        VIP/32 multipath            --veth-- 10.97.2.2  fleet2  lo: VIP
                        (hash on the 4-tuple)       --veth-- 10.97.3.2  fleet3  lo: VIP

Each host is a booted container (tests/container.py) provisioned by the real playbook over
SSH (tests/playbook.py); the service address (``VIP``) is on every host's loopback, and
the router, a network namespace of the test's, routes it over all hosts with one
multipath route and ``net.ipv4.fib_multipath_hash_policy=1`` (source and destination
address and port: flows spread by their 4-tuple, as a router's ECMP does). Every host runs
the same config: one app on ``PORT`` whose target (127.0.0.1:``TARGET_PORT`` on that
host) greets with the host's name, so a client knows where each connection went.

:meth:`Fleet.under_traffic` runs an action (a rollout) while 300 connections are held
through the VIP (idle, and streaming with a sha256 each way: tests/held.py) and a new
connection is opened every 10 ms, and measures what the clients saw.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from booted import Appliance, wait_active
from container import Container
from held import Held, Prober
from helpers import REPO
from netns import NetNS
from playbook import Hosts

VIP = "10.99.0.100"
PORT = 5001
TARGET_PORT = 19001
CONFIG = {"Apps": [{"Name": "fleet", "Ports": [PORT], "Targets": [f"127.0.0.1:{TARGET_PORT}"]}]}
IDLE, STREAMING = 280, 20  # held through every rollout
PROBE_PACE_S = 0.01
ROLLOUT_BOUND_S = 900  # the prober's bound: no rollout here takes that long


@dataclasses.dataclass
class Measured:
    """What the clients saw while ``what`` ran."""
    what: str
    wall_s: float
    held: int  # held connections that came through whole
    lost: int
    new_ok: int
    new_failed: int
    spread: dict[str, int]  # held connections per host
    lost_by_host: dict[str, int]
    problems: list[str]
    probe_failures: list[str]

    def row(self) -> str:
        spread = " / ".join(str(self.spread.get(h, 0)) for h in sorted(self.spread))
        lost = (f"{self.lost}" if not self.lost else
                f"{self.lost} ({', '.join(f'{h}: {n}' for h, n in sorted(self.lost_by_host.items()))})")
        return (f"| {self.what} | {self.wall_s:.0f} s | {self.held} of {self.held + self.lost} "
                f"({spread}) | {lost} | {self.new_ok + self.new_failed} | {self.new_failed} |")


HEADER = ("| rollout | wall time | held connections kept (per host) | lost | new connections "
          "| new failed |\n|---|---|---|---|---|---|")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Fleet:
    """``size`` booted, provisioned appliances behind ``VIP``; ``close()`` tears it all
    down (containers, namespaces, targets), whatever state it is in."""

    def __init__(self, workdir: Path, size: int):
        self.workdir = workdir
        self.names = [f"fleet{i}" for i in range(1, size + 1)]
        self.containers: dict[str, Container] = {}
        self.appliances: list[Appliance] = []
        self.router = self.client = None
        self.results: list[Measured] = []
        self.notes: list[str] = []  # written after the table (a failed host's state)
        try:
            self._boot()
            self.hosts = Hosts(workdir, self.containers)
            self._network()
            for name, c in self.containers.items():
                app = Appliance(c)
                self.appliances.append(app)
                app.backend(name, TARGET_PORT)  # greets with the host's name
                app.backends[TARGET_PORT].idle_timeout_s = ROLLOUT_BOUND_S
            first = self.playbook(CONFIG)
            assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        except BaseException:
            self.close()
            raise

    def _boot(self) -> None:
        tag = uuid.uuid4().hex[:6]
        with concurrent.futures.ThreadPoolExecutor(len(self.names)) as pool:
            futures = {name: pool.submit(Container, f"flyproxy-{name}-{tag}",
                                         self.workdir / f"{name}-console.log")
                       for name in self.names}
            errors = []
            for name, future in futures.items():
                try:
                    self.containers[name] = future.result()
                except Exception as e:  # the others booted: close() stops them
                    errors.append(f"{name}: {e}")
            if errors:
                raise RuntimeError("containers did not boot: " + "; ".join(errors))

    def _network(self) -> None:
        self.router = NetNS("flyproxy-fleet-router")
        self.client = NetNS("flyproxy-fleet-client")
        r, cl = self.router.name, self.client.name
        _ip("-n", cl, "link", "add", "client0", "type", "veth", "peer", "name", "client",
            "netns", r)
        _ip("-n", cl, "addr", "add", "10.98.0.2/24", "dev", "client0")
        _ip("-n", cl, "link", "set", "client0", "up")
        _ip("-n", cl, "route", "add", "default", "via", "10.98.0.1")
        _ip("-n", r, "addr", "add", "10.98.0.1/24", "dev", "client")
        _ip("-n", r, "link", "set", "client", "up")
        for key, value in (("net.ipv4.ip_forward", "1"),
                           ("net.ipv4.fib_multipath_hash_policy", "1"),
                           ("net.ipv4.conf.all.rp_filter", "0"),
                           ("net.ipv4.conf.default.rp_filter", "0")):
            self.router.exec(["sysctl", "-qw", f"{key}={value}"], check=True)
        for i, (name, c) in enumerate(self.containers.items(), 1):
            _ip("-n", r, "link", "add", name, "type", "veth", "peer", "name", "fleet0",
                "netns", str(c.leader))
            _ip("-n", r, "addr", "add", f"10.97.{i}.1/24", "dev", name)
            _ip("-n", r, "link", "set", name, "up")
            c.sh(f"ip addr add 10.97.{i}.2/24 dev fleet0; ip link set fleet0 up; "
                 f"ip addr add {VIP}/32 dev lo; ip route add default via 10.97.{i}.1")
        self.route(self.names)

    def gateway(self, name: str) -> str:
        return f"10.97.{self.names.index(name) + 1}.2"

    def route(self, names: list[str]) -> None:
        """The router's route to the VIP: one multipath route over ``names``."""
        hops = [w for n in names for w in ("nexthop", "via", self.gateway(n), "dev", n)]
        _ip("-n", self.router.name, "route", "replace", f"{VIP}/32", *hops)

    def resilient_route(self, names: list[str]) -> None:
        """The route over a resilient nexthop group (the kernel's consistent hashing:
        buckets of a next hop that leaves are moved, no other bucket is): created, or
        changed to ``names``."""
        r = self.router.name
        for n in self.names:
            _ip("-n", r, "nexthop", "replace", "id", str(self.names.index(n) + 1),
                "via", self.gateway(n), "dev", n)
        group = "/".join(str(self.names.index(n) + 1) for n in names)
        _ip("-n", r, "nexthop", "replace", "id", "100", "group", group, "type", "resilient",
            "buckets", "512")
        _ip("-n", r, "route", "replace", f"{VIP}/32", "nhid", "100")

    def playbook(self, config: dict, *extra: str):
        """The playbook over every host with ``config`` (extra-vars, as an operator's
        group_vars would be)."""
        path = self.workdir / f"vars-{len(self.hosts.runs)}.json"
        path.write_text(json.dumps({"flyproxy_config": config}))
        return self.hosts.playbook("-e", f"@{path}", *extra)

    def each(self, script: str) -> dict[str, str]:
        """``script``'s output on every host."""
        return {n: c.sh(script).stdout.strip() for n, c in self.containers.items()}

    def state(self) -> dict[str, tuple[str, str, str]]:
        """Per host: the config's sha256, the proxy's MainPID, the package's version."""
        out = self.each("sha256sum /etc/flyproxy/config.json | cut -d' ' -f1; "
                        "systemctl show -P MainPID flyproxy.service; "
                        "dpkg-query -W -f='${Version}' flyproxy")
        return {n: tuple(v.split("\n")) for n, v in out.items()}

    def under_traffic(self, what: str, action, idle: int = IDLE,
                      streaming: int = STREAMING):
        """Run ``action()`` while connections are held and probed through the VIP;
        returns (its result, what the clients saw), and keeps the latter in results."""
        for c in self.containers.values():
            wait_active(c, "flyproxy.service")
        held = Held(PORT, tuple(self.names), self.client.entered, idle=idle,
                    streaming=streaming, host=VIP)
        prober = Prober(PORT, tuple(self.names), self.client.entered, host=VIP,
                        pace=PROBE_PACE_S, max_probes=int(ROLLOUT_BOUND_S / PROBE_PACE_S))
        started = time.monotonic()
        try:
            result = action()
        finally:
            wall = time.monotonic() - started
            ok, failed = prober.finish()
            problems = held.finish()
        spread = collections.Counter(held.landed.values())
        lost_by_host = collections.Counter(held.landed[p.split(":")[0]] for p in problems)
        measured = Measured(what, wall, idle + streaming - len(problems), len(problems), ok,
                            len(failed), dict(spread), dict(lost_by_host), problems, failed)
        self.results.append(measured)
        return result, measured

    def report(self) -> str:
        return HEADER + "\n" + "\n".join(m.row() for m in self.results)

    def close(self) -> None:
        for app in self.appliances:
            app.stop()
        for ns in (self.client, self.router):
            if ns is not None:
                ns.delete()
        for c in self.containers.values():
            c.stop()


def fleet_of(size: int):
    """A module's fixture: a Fleet of ``size`` hosts for its tests, torn down after them,
    also when a test or the lab's own setup fails; what the clients saw is written to
    build/fleet/<module>.md (the table docs/testing.md quotes)."""
    @pytest.fixture(scope="module")
    def fleet(request, tmp_path_factory):
        lab = Fleet(tmp_path_factory.mktemp("fleet"), size)
        try:
            yield lab
        finally:
            out = REPO / "build" / "fleet" / f"{request.module.__name__}.md"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(lab.report() + "\n\n" + "\n\n".join(lab.notes) + "\n")
            lab.close()
    return fleet
