"""The playbook itself: idempotent, a bad config stops the rollout before any host, a
config change or a new package version is applied by a reload."""

from __future__ import annotations

import json
import re

from debs import SUFFIX, changelog_version, upgraded_deb
from held import Held


def test_second_run_changes_nothing(provisioned):
    second = provisioned.playbook()
    assert second.returncode == 0, second.stdout[-4000:]
    recap = provisioned.recap(second)
    assert recap["changed"] == 0, second.stdout[-4000:]
    assert recap["failed"] == 0


def test_a_bad_config_stops_the_rollout_before_any_host_is_touched(provisioned, host):
    before = host.file("/etc/flyproxy/config.json").sha256sum
    bad = provisioned.workdir / "bad.json"
    bad.write_text(json.dumps({"flyproxy_config": {"Apps": [
        {"Name": "x", "Ports": [5001, 5001], "Targets": ["nope"]}]}}))
    result = provisioned.playbook("-e", f"@{bad}")
    assert result.returncode != 0
    assert "Apps[0].Ports[1]: port 5001 is already used by Apps[0]" in result.stdout  # (quoted)
    assert "Roll out flyproxy" not in result.stdout  # the second play never started
    assert host.file("/etc/flyproxy/config.json").sha256sum == before


def test_a_config_change_is_rolled_out_with_a_reload(provisioned, host):
    pid = host.check_output("systemctl show -P MainPID flyproxy.service")
    change = provisioned.workdir / "change.json"
    change.write_text(json.dumps({"flyproxy_config": {"Apps": [
        {"Name": "five-thousand", "Ports": [5001, 5555], "Targets": ["127.0.0.1:15001"]}]}}))
    try:
        result = provisioned.playbook("-e", f"@{change}")
        assert result.returncode == 0, result.stdout[-4000:]
        assert "RUNNING HANDLER [flyproxy : Reload flyproxy]" in result.stdout
        assert host.check_output("printf 'via 5555\\n' | nc -N -w 5 127.0.0.1 5555") == "via 5555"
        assert host.check_output("systemctl show -P MainPID flyproxy.service") == pid  # reloaded, not restarted
    finally:
        restore = provisioned.playbook()
        assert restore.returncode == 0, restore.stdout[-4000:]


def changed_tasks(result) -> list[str]:
    """The tasks and handlers that reported a change, in order."""
    changed, task = [], None
    for line in result.stdout.splitlines():
        if header := re.match(r"(?:TASK|RUNNING HANDLER) \[(.+?)\]", line):
            task = header[1]
        elif line.startswith("changed:"):
            changed.append(task)
    return changed


def test_a_new_package_version_is_rolled_out_with_a_reload(provisioned, host):
    """A newer package (tests/debs.py): the reload handler fires, not the restart one; the
    proxy serves the new version under the same MainPID, and the connections open through
    it all along (idle, streaming) come through whole."""
    pid = host.check_output("systemctl show -P MainPID flyproxy.service")
    version = changelog_version() + SUFFIX
    held = Held(5001, None, provisioned.container.entered, idle=3, streaming=3)
    try:
        result = provisioned.playbook("-e", f"flyproxy_deb={upgraded_deb()}")
        assert result.returncode == 0, result.stdout[-4000:]
    finally:
        problems = held.finish()
    assert problems == [], (problems, result.stdout[-3000:])
    assert changed_tasks(result) == ["flyproxy : Copy the package to the host",
                                     "flyproxy : Install the package",
                                     "flyproxy : Reload flyproxy"], result.stdout[-4000:]
    assert "Restart flyproxy" not in result.stdout
    assert host.check_output("flyproxy --version") == f"flyproxy {version}"
    assert json.loads(host.check_output("flyproxy status --json"))["version"] == version
    assert host.check_output("systemctl show -P MainPID flyproxy.service") == pid
    # Back to this tree's package: a downgrade, by reload too.
    restore = provisioned.playbook()
    assert restore.returncode == 0, restore.stdout[-4000:]
    assert "flyproxy : Reload flyproxy" in changed_tasks(restore)
    assert host.package("flyproxy").version == changelog_version()
    assert host.check_output("systemctl show -P MainPID flyproxy.service") == pid
