"""The proxy's sandbox, as systemd reports it."""

import json

import pytest


@pytest.mark.parametrize("prop, value", [
    ("DynamicUser", "yes"),
    ("NoNewPrivileges", "yes"),
    ("CapabilityBoundingSet", ""),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "yes"),
    ("PrivateDevices", "yes"),
    ("PrivateUsers", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectControlGroups", "yes"),
    ("RestrictNamespaces", "yes"),
    ("MemoryDenyWriteExecute", "yes"),
    ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("LimitNOFILE", "1048576"),  # room for 100,000+ connections per worker (NOTES)
])
def test_sandbox_property(host, prop, value):
    # systemctl show leaves empty properties out: an empty bounding set is "missing"
    assert host.service("flyproxy.service").systemd_properties.get(prop, "") == value


def test_proxy_process_has_no_capabilities(host):
    pid = host.check_output("systemctl show -P MainPID flyproxy.service")
    assert host.check_output(f"grep CapEff /proc/{pid}/status").split()[1] == "0000000000000000"


def test_exposure_score(host):
    out = host.run("systemd-analyze security --no-pager flyproxy.service").stdout
    score = float(out.rsplit("Overall exposure level for flyproxy.service:", 1)[1].split()[0])
    assert score <= 1.5


def test_workers_as_configured_and_unprivileged(host):
    """flyproxy_workers defaults to auto: one worker per CPU, none with a capability."""
    status = json.loads(host.check_output("flyproxy status --json"))
    assert len(status["workers"]) == int(host.check_output("nproc"))
    assert all(w["ready"] for w in status["workers"])
    for w in status["workers"]:
        assert host.check_output(f"grep CapEff /proc/{w['pid']}/status").split()[1] == "0" * 16
    dropin = host.file("/etc/systemd/system/flyproxy.service.d/workers.conf")
    assert dropin.contains("FLYPROXY_WORKERS=auto")
    assert dropin.contains("FLYPROXY_CONFIG=/etc/flyproxy/config.json")  # flyproxy_config_path
    environment = host.check_output("systemctl show -P Environment flyproxy.service")
    assert "FLYPROXY_CONFIG=/etc/flyproxy/config.json" in environment.split()
    assert dropin.contains("LimitNOFILE=1048576")  # flyproxy_limit_nofile's default


def test_the_running_proxy_has_the_units_fd_limit(host):
    """The unit's LimitNOFILE, as far as the host lets systemd raise it (a test container
    inherits its host's hard limit; a VM or a real host gives the full 1,048,576)."""
    import json
    hard = host.check_output("awk '/Max open files/ {print $5}' /proc/1/limits")
    want = min(1048576, int(hard)) if hard.isdigit() else 1048576
    status = json.loads(host.check_output("flyproxy status --json"))
    assert {w["fds"]["limit"] for w in status["workers"]} == {want}
