"""The systemd units: installed, enabled, running."""

import pytest


@pytest.mark.parametrize("unit, enabled", [
    ("flyproxy.socket", True),
    ("flyproxy.service", None),  # started by the socket (Wants=), not enabled on its own
    ("flyproxy-echo.service", True),
    ("flyproxy-bpf-metrics.timer", True),
])
def test_unit_is_running(host, unit, enabled):
    service = host.service(unit)
    assert service.is_running
    if enabled is not None:
        assert service.is_enabled == enabled


def test_proxy_reported_ready(host):
    props = host.service("flyproxy.service").systemd_properties
    assert props["Type"] == "notify"
    assert props["StatusText"].startswith("generation ")


def test_the_unit_points_at_the_manual_and_runs_a_supervisor(host):
    props = host.service("flyproxy.service").systemd_properties
    assert "man:flyproxy(8)" in [d.strip('"') for d in props["Documentation"].split()]
    assert "FLYPROXY_SUPERVISOR=yes" in props["Environment"].split()
    assert host.file("/usr/share/man/man8/flyproxy.8.gz").exists
