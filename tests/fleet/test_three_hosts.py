"""Three appliances behind one address, changed under their clients (`make fleet-test`).

The tests run in file order on one lab (fleet_lab.py): a config change and a package
upgrade rolled one host at a time, the rollback of that package, a config that fails
validation, a host that fails the port check after its batch, and a host withdrawn from
the route, with the kernel's plain multipath hashing and with a resilient nexthop group.
Every rollout runs under 300 held connections (idle, and streaming with a sha256 each way)
and a new connection every 10 ms through the VIP; the table of what the clients saw is
build/fleet/test_three_hosts.md (docs/testing.md quotes it).
"""

from __future__ import annotations

import json
import re

import pytest

from debs import SUFFIX, changelog_version, upgraded_deb
from fleet_lab import CONFIG, PORT, VIP, fleet_of
from helpers import greet

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(1800)]

fleet = fleet_of(3)

HOSTS = ("fleet1", "fleet2", "fleet3")
# The config change: the app gets a second port.
CHANGED = {"Apps": [{**CONFIG["Apps"][0], "Ports": [PORT, 5002]}]}


def rolled(fleet, config: dict, *extra: str):
    return fleet.playbook(config, "-e", "flyproxy_serial=1", *extra)


def batches(result) -> int:
    return result.stdout.count("PLAY [Roll out flyproxy]")


def assert_nobody_noticed(seen) -> None:
    assert seen.spread.keys() == set(HOSTS), seen.spread  # every host held connections
    assert seen.problems == [], seen.problems[:10]
    assert seen.probe_failures == [] and seen.new_ok > 0, seen.probe_failures[:10]


def test_a_config_change_rolled_host_by_host_cuts_nothing(fleet):
    before = fleet.state()
    result, seen = fleet.under_traffic("config change (a port added), serial 1",
                                       lambda: rolled(fleet, CHANGED))
    assert result.returncode == 0, result.stdout[-6000:]
    assert batches(result) == 3
    assert_nobody_noticed(seen)
    after = fleet.state()
    for host in HOSTS:
        assert after[host][0] != before[host][0] and after[host][1] == before[host][1]
    # the new port answers through the VIP, on every host (the greeting says which)
    seen_on = {greet(5002, VIP, namespace=fleet.client.entered) for _ in range(60)}
    assert seen_on == set(HOSTS)


def test_a_package_upgrade_rolled_host_by_host_loses_no_connection(fleet):
    before = fleet.state()
    result, seen = fleet.under_traffic(
        "package upgrade, serial 1",
        lambda: rolled(fleet, CHANGED, "-e", f"flyproxy_deb={upgraded_deb()}"))
    assert result.returncode == 0, result.stdout[-6000:]
    assert batches(result) == 3
    assert_nobody_noticed(seen)
    for host, (config, pid, version) in fleet.state().items():
        assert version == changelog_version() + SUFFIX
        assert (config, pid) == before[host][:2]  # reloaded, not restarted


def test_rolling_the_package_back_loses_no_connection(fleet):
    """The rollback is the same playbook with the previous package (build/'s)."""
    before = fleet.state()
    result, seen = fleet.under_traffic("package rollback, serial 1",
                                       lambda: rolled(fleet, CHANGED))
    assert result.returncode == 0, result.stdout[-6000:]
    assert_nobody_noticed(seen)
    for host, (config, pid, version) in fleet.state().items():
        assert version == changelog_version()
        assert (config, pid) == before[host][:2]


def test_a_config_that_fails_validation_stops_in_the_preflight_play(fleet):
    before = fleet.state()
    bad = {"Apps": [{**CONFIG["Apps"][0], "Ports": [PORT, PORT]}]}
    result, seen = fleet.under_traffic("config that fails validation",
                                       lambda: rolled(fleet, bad))
    assert result.returncode != 0
    assert "Apps[0].Ports[1]: port 5001 is already used by Apps[0]" in result.stdout
    assert "PLAY [Roll out flyproxy]" not in result.stdout  # no host touched
    assert fleet.state() == before
    assert_nobody_noticed(seen)


def test_a_host_failing_the_port_check_stops_the_rollout_after_its_batch(fleet):
    """fleet2 cannot be reached on the port the new config adds (a policy-routing rule
    refuses it there, as a host firewall nobody opened would): its batch fails the port
    check, the rollout stops, fleet3 is never touched and fleet1 keeps the new config."""
    added = {"Apps": [{**CONFIG["Apps"][0], "Ports": [PORT, 5002, 5003]}]}
    before = fleet.state()
    fault = fleet.containers["fleet2"]
    # (the local table's rule, first at preference 0, moved behind the one that refuses)
    fault.sh("ip rule add pref 100 lookup local; ip rule del pref 0; "
             "ip rule add pref 10 ipproto 6 dport 5003 prohibit")
    try:
        result, seen = fleet.under_traffic(
            "a host fails the port check (fleet2 of 3)",
            lambda: rolled(fleet, added, "-e", "flyproxy_port_check_timeout=5"))
        shown = fault.sh("flyproxy status; ip rule show").stdout
    finally:
        fault.sh("ip rule del pref 10; ip rule add pref 0 lookup local; ip rule del pref 100")
    assert result.returncode != 0
    assert batches(result) == 2  # the third batch never started
    failed = re.search(r"^fatal: \[fleet2\].*$", result.stdout, re.M)
    assert failed and "port 5003 does not answer" in failed[0], result.stdout[-4000:]
    assert fleet.hosts.recap(result, "fleet1")["failed"] == 0
    assert fleet.hosts.recap(result, "fleet2")["failed"] == 1
    after = fleet.state()
    assert after["fleet1"][0] == after["fleet2"][0] != before["fleet1"][0]  # new config
    assert after["fleet3"] == before["fleet3"]  # untouched
    assert "5003" in shown
    try:  # (the task's result, as JSON after "=>"): its stderr says which port and why
        why = json.loads(failed[0].split(" => ", 1)[1]).get("stderr", failed[0])
    except (IndexError, ValueError, AttributeError):
        why = failed[0]
    fleet.notes.append(f"The port check's failure, as ansible-playbook printed it:\n\n"
                       f"    fatal: [fleet2]: {why[:400]}\n\nfleet2's state then (`flyproxy status`, "
                       f"and the rule that blocks the port):\n\n"
                       + "\n".join("    " + line for line in shown.splitlines()))
    assert_nobody_noticed(seen)


def withdrawn(fleet, what: str, route) -> object:
    """fleet3 withdrawn from the route while connections are open; what was lost."""
    route(list(HOSTS))
    try:
        _, seen = fleet.under_traffic(what, lambda: route(list(HOSTS[:2])))
    finally:
        fleet.route(list(HOSTS))
    assert seen.spread.keys() == set(HOSTS), seen.spread
    # every connection that went to fleet3 is lost: its packets now reach a host that has
    # no socket for them, and that host's kernel answers with a reset
    assert seen.lost_by_host.get("fleet3") == seen.spread["fleet3"], seen
    return seen


def test_withdrawing_a_host_from_the_route_rehashes_flows_of_the_others(fleet):
    """Linux's multipath route (hash-threshold): with one next hop fewer the hash space
    is cut anew, and part of the flows of the hosts that stay move too."""
    seen = withdrawn(fleet, "fleet3 withdrawn from the route (plain multipath)", fleet.route)
    assert seen.lost_by_host.get("fleet1", 0) + seen.lost_by_host.get("fleet2", 0) > 0, seen


def test_with_a_resilient_nexthop_group_only_the_withdrawn_hosts_flows_move(fleet):
    """A resilient nexthop group (consistent hashing in the kernel): only the buckets of
    the next hop that left are moved; fleet1's and fleet2's connections all stay."""
    seen = withdrawn(fleet, "fleet3 withdrawn (resilient nexthop group)",
                     fleet.resilient_route)
    assert set(seen.lost_by_host) == {"fleet3"}, seen
