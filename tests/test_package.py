"""The Debian package (`make deb`) in a booted Debian 12 container, as an operator meets it:
dpkg owns every file; install starts the socket (and so the proxy and the BPF steering);
an upgrade to a newer package reloads the proxy onto the new code without closing or
refusing a connection; remove and purge leave nothing behind."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from appliance import __version__
from appliance.demo import demo_document
from booted import Appliance, wait_active
from container import Container
from debs import SUFFIX, upgraded_deb
from held import Held, Prober
from helpers import REPO, built_deb, wait_until

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def appliance(tmp_path_factory):
    """A container with the package installed (tests run in file order: the last removes it)."""
    logs = tmp_path_factory.mktemp("package")
    c = Container(f"flyproxy-pkg-{uuid.uuid4().hex[:6]}", logs / "console.log")
    app = Appliance(c)
    try:
        c.sh("/src/flyproxy/bpf/kernel-headers.sh")
        c.sh(f"DEBIAN_FRONTEND=noninteractive dpkg -i /src/flyproxy/build/{built_deb().name}")
        yield app
    finally:
        app.stop()
        c.stop()


def changelog_version() -> str:
    return re.match(r"flyproxy \(([^)]+)\)", (REPO / "debian" / "changelog").read_text())[1]


def test_the_versions_agree():
    pyproject = re.search(r'(?m)^version = "([^"]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert changelog_version() == __version__ == pyproject
    assert built_deb().name == f"flyproxy_{__version__}_all.deb"


def test_dpkg_owns_every_file(appliance):
    c = appliance.c
    files = set(c.run(["dpkg", "-L", "flyproxy"]).stdout.split())
    for path in ("/usr/bin/flyproxy", "/lib/systemd/system/flyproxy.socket",
                 "/lib/systemd/system/flyproxy.service", "/etc/flyproxy/config.json",
                 "/usr/share/man/man8/flyproxy.8.gz", "/usr/share/doc/flyproxy/NOTES.md.gz",
                 "/usr/lib/flyproxy/bpf/kernel-headers.sh",
                 "/usr/lib/python3/dist-packages/appliance/dataplane/proxy.py",
                 "/usr/lib/python3/dist-packages/appliance/bpf/steer.c",
                 "/usr/lib/python3/dist-packages/appliance/config.schema.json"):
        assert path in files, path
    conffiles = c.run(["dpkg-query", "-W", "-f=${Conffiles}", "flyproxy"]).stdout
    assert "/etc/flyproxy/config.json" in conffiles
    assert c.run(["flyproxy", "--version"]).stdout.strip() == f"flyproxy {changelog_version()}"
    manual = c.run(["zcat", "/usr/share/man/man8/flyproxy.8.gz"]).stdout
    assert "flyproxy \\- L4 TCP proxy appliance" in manual and "reload" in manual
    assert c.run(["dpkg", "--verify", "flyproxy"]).stdout == ""  # nothing changed since


def test_install_enabled_and_started_the_socket_and_a_steered_port_answers(appliance):
    c = appliance.c
    assert c.run(["systemctl", "is-enabled", "flyproxy.socket"]).stdout.strip() == "enabled"
    wait_active(c, "flyproxy.socket")
    appliance.configure(demo_document())
    c.run(["systemctl", "reload", "flyproxy.service"])
    wait_active(c, "flyproxy.service")
    assert appliance.greet(6300) == "six-thousand"  # steered by BPF to systemd's socket
    assert "6300" in c.run(["flyproxy", "bpf", "status"]).stdout


def test_an_upgrade_reloads_the_proxy_and_every_connection_survives(appliance):
    """apt-get install of a newer package: its postinst reloads the proxy, which moves to
    the new code (the supervisor re-executes in place, a new worker generation serves new
    connections) while the old generation carries its connections on."""
    c = appliance.c
    new = upgraded_deb()
    version = changelog_version() + SUFFIX
    socket_since = c.run(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                          "flyproxy.socket"]).stdout
    pid = appliance.main_pid()
    held = Held(5001, "five-thousand", c.entered)
    prober = Prober(6300, "six-thousand", c.entered)
    try:
        wait_until(lambda: all(held.received()), "bytes flowing on every streaming connection")
        install = c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                       f"/src/flyproxy/{new.relative_to(REPO)}", check=False, timeout=300)
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        flowing = held.received()
        wait_until(lambda: all(now > then for now, then in zip(held.received(), flowing)),
                   "bytes flowing on every streaming connection after the upgrade")
        status = json.loads(c.run(["flyproxy", "status", "--json"]).stdout)
    finally:
        ok, failures = prober.finish()
        problems = held.finish()
    assert failures == [] and ok > 0, failures[:5]
    assert problems == []
    assert "restarting" not in install.stdout + install.stderr, install.stdout[-3000:]
    assert c.run(["flyproxy", "--version"]).stdout.strip() == f"flyproxy {version}"
    assert c.run(["dpkg-query", "-W", "-f=${Version}", "flyproxy"]).stdout == version
    assert status["version"] == version
    *old, serving = status["generations"]
    assert serving["version"] == version and serving["draining_since"] is None
    assert [g["version"] for g in old] == [__version__], old  # ... draining the 20 held
    assert old[0]["draining_since"] is not None and old[0]["active"] == 20, old
    assert appliance.main_pid() == pid  # reloaded, not restarted: the supervisor re-executed
    assert c.run(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                  "flyproxy.socket"]).stdout == socket_since
    # Its connections ended, the old generation is gone.
    wait_until(lambda: len(json.loads(c.run(["flyproxy", "status", "--json"]).stdout)[
        "generations"]) == 1, "the old generation gone once its connections ended")


def test_a_proxy_that_cannot_move_by_reload_is_restarted_by_an_upgrade(appliance):
    """A single process (FLYPROXY_WORKERS=1 without a supervisor) cannot start new workers
    beside itself: after its reload it still runs the old code, so the postinst restarts
    it, and says so (the same for a proxy from before upgrades by reload)."""
    c = appliance.c
    c.sh("mkdir -p /run/systemd/system/flyproxy.service.d && printf '[Service]\\n"
         "Environment=FLYPROXY_WORKERS=1\\nEnvironment=FLYPROXY_SUPERVISOR=auto\\n' "
         "> /run/systemd/system/flyproxy.service.d/single.conf && systemctl daemon-reload "
         "&& systemctl restart flyproxy.service")
    try:
        wait_active(c, "flyproxy.service")
        assert "version" not in json.loads(c.run(["flyproxy", "status", "--json"]).stdout)
        pid = appliance.main_pid()
        install = c.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall "
                       f"/src/flyproxy/{upgraded_deb().relative_to(REPO)}", check=False,
                       timeout=300)
        journal = c.run(["journalctl", "-u", "flyproxy.service", "--no-pager", "-n", "80"],
                        check=False).stdout
        assert install.returncode == 0, (install.stdout[-2000:] + install.stderr[-2000:]
                                         + journal)
        said = install.stdout + install.stderr  # (apt passes dpkg's stderr on to stdout)
        assert "cannot move to" in said and "restarting it" in said, said[-3000:]
        wait_active(c, "flyproxy.service")
        assert appliance.main_pid() != pid
        assert appliance.greet(6300) == "six-thousand"
    finally:
        c.sh("rm -r /run/systemd/system/flyproxy.service.d && systemctl daemon-reload "
             "&& systemctl restart flyproxy.service")
        wait_active(c, "flyproxy.service")


def test_remove_then_purge_leave_nothing_behind(appliance):
    c = appliance.c
    c.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq flyproxy >/dev/null")
    units = c.run(["systemctl", "list-unit-files", "flyproxy*", "--no-legend"], check=False)
    assert units.stdout.strip() == "", units.stdout  # (and it exits 1: no such unit file)
    assert c.run(["test", "-e", "/sys/fs/bpf/flyproxy"], check=False).returncode == 1  # unpinned
    # no sk_lookup link left in this container's network namespace (bpftool lists the
    # links of every namespace: other test containers may have theirs)
    netns = int(c.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).stdout)
    links = json.loads(c.run(["bpftool", "--json", "link", "show"]).stdout or "[]")
    assert [link for link in links if link.get("netns_ino") == netns] == []
    assert c.run(["test", "-e", "/etc/flyproxy/config.json"], check=False).returncode == 0  # kept
    c.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq flyproxy >/dev/null")
    assert c.run(["test", "-e", "/etc/flyproxy"], check=False).returncode == 1
    status = c.run(["dpkg-query", "-W", "-f=${Status}", "flyproxy"], check=False)
    assert status.returncode != 0 or status.stdout.endswith("not-installed"), status.stdout
