"""The role installs the appliance as its Debian package: one layout, owned by dpkg."""

from __future__ import annotations

from appliance import __version__


def test_the_appliance_is_its_debian_package(host):
    package = host.package("flyproxy")
    assert package.is_installed
    assert package.version == __version__
    for path in ("/usr/bin/flyproxy", "/lib/systemd/system/flyproxy.service",
                 "/etc/flyproxy/config.json"):
        assert host.check_output(f"dpkg -S {path}").startswith("flyproxy: "), path
    assert not host.file("/usr/lib/flyproxy/appliance").exists  # no copied tree beside it


def test_the_packages_files_are_as_shipped_but_the_config(host):
    changed = host.check_output("dpkg --verify flyproxy || true")
    assert [line.split()[-1] for line in changed.splitlines()] in ([], ["/etc/flyproxy/config.json"])
