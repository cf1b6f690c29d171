"""The fleet lab's small version, part of `make test`: two appliances behind one address,
a package upgrade rolled one host at a time under traffic. The full lab (three hosts,
every kind of rollout, route withdrawal) is test_three_hosts.py, `make fleet-test`."""

from __future__ import annotations

import pytest

from debs import SUFFIX, changelog_version, upgraded_deb
from fleet_lab import CONFIG, fleet_of

pytestmark = pytest.mark.timeout(1500)

fleet = fleet_of(2)


def test_a_package_upgrade_rolled_host_by_host_loses_no_connection(fleet):
    before = fleet.state()
    result, seen = fleet.under_traffic(
        "package upgrade, serial 1 (2 hosts)",
        lambda: fleet.playbook(CONFIG, "-e", "flyproxy_serial=1",
                               "-e", f"flyproxy_deb={upgraded_deb()}"))
    assert result.returncode == 0, result.stdout[-6000:]
    assert result.stdout.count("PLAY [Roll out flyproxy]") == 2  # one batch per host
    assert seen.spread.keys() == {"fleet1", "fleet2"}, seen  # both hosts held connections
    assert seen.problems == [], seen.problems[:10]
    assert seen.probe_failures == [] and seen.new_ok > 0, seen.probe_failures[:10]
    after = fleet.state()
    for host, (config, pid, version) in after.items():
        assert version == changelog_version() + SUFFIX
        assert (config, pid) == before[host][:2]  # reloaded, not restarted
