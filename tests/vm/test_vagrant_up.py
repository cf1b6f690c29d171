"""The design card's first use, for real: ``vagrant up`` with the project's Vagrantfile.

A libvirt VM under qemu emulation, booted from a Debian 12 box built here (Debian's own
6.1 kernel; none of the appliance's packages), provisioned by the Vagrantfile's own
provisioners (shell, then ansible_local running ansible/site.yml), its packages installed by
apt from a local repository, since the VM has no network beyond its host. Everything runs in
a network namespace of the lab's own (lab.py); the checks connect there. About 15-25 min.

``FLYPROXY_VM_TEST=0`` skips it (for a quick local run); CI runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from debs import SUFFIX, changelog_version, upgraded_deb
from helpers import built_deb, connect, recv_all
from lab import BOX_NAME, REPO, Lab, ensure_box

pytestmark = [pytest.mark.timeout(3600), pytest.mark.vm]

DEMO_PORTS = [int(p) for p in re.search(r"DEMO_PORTS = \[([\d, ]+)\]",
                                        (REPO / "Vagrantfile").read_text()).group(1).split(",")]
TIMES = REPO / "build" / "vagrant-test-times.txt"


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    if os.environ.get("FLYPROXY_VM_TEST") == "0":
        pytest.skip("FLYPROXY_VM_TEST=0")
    missing = [t for t in ("vagrant", "libvirtd", "qemu-system-x86_64", "debootstrap")
               if not shutil.which(t)]
    assert os.geteuid() == 0 and not missing, f"needs root and {missing} (make deps)"
    started = time.monotonic()
    box = ensure_box(built_deb())
    box_s = time.monotonic() - started
    lab = Lab(Path(tmp_path_factory.mktemp("vm")), box)
    lab.times.append(("box (build or cache)", box_s))
    try:
        lab.vagrant("box", "add", "--force", "--name", BOX_NAME,
                    str(box / "flyproxy-bookworm.box"), phase="vagrant box add")
        up = lab.vagrant("up", "--provider=libvirt", "--timestamp", timeout=2700,
                         phase="vagrant up (boot, shell + ansible_local provisioning)")
        lab.up_output = up.stdout
        yield lab
    finally:
        TIMES.parent.mkdir(exist_ok=True)
        TIMES.write_text("".join(f"{what}: {secs:.0f} s\n" for what, secs in lab.times))
        try:
            log = (lab.workdir / "vagrant.log").read_text()
            print(log[-20000:])
        except OSError:
            pass
        lab.close()


def echo(lab: Lab, port: int, text: str, timeout: float = 20) -> str:
    """Send ``text`` to 127.0.0.1:port in the lab's namespace (a vagrant forwarded port)
    and read until the other side closes."""
    with connect(port, timeout=timeout, namespace=lab.ns.entered) as s:
        s.sendall(text.encode())
        s.shutdown(socket.SHUT_WR)
        return recv_all(s).decode()


def guest_echo(lab: Lab, port: int, text: str) -> str:
    """The same, from inside the VM to its own loopback (no netcat there: python3)."""
    return lab.ssh(
        "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', %d), 10); "
        "s.sendall(b'%s'); s.shutdown(1); print(s.makefile().read(), end='')\"" % (port, text))


def test_the_vagrantfile_provisioned_the_vm(vm):
    assert "Running provisioner: shell" in vm.up_output
    assert "Running provisioner: ansible_local" in vm.up_output
    assert re.search(r"default\s*:\s*ok=\d+\s+changed=[1-9]\d*\s+unreachable=0\s+failed=0",
                     vm.up_output), vm.up_output[-4000:]


@pytest.mark.parametrize("port", DEMO_PORTS)
def test_every_demo_port_answers_through_its_forwarded_port(vm, port):
    assert echo(vm, port, f"hello {port}\n") == f"hello {port}\n"


def test_the_kernel_is_debians_and_bcc_compiled_against_its_headers(vm):
    release = vm.ssh("uname -r").strip()
    assert re.fullmatch(r"6\.1\.\d+-\d+-amd64", release), release
    status = vm.ssh(f"dpkg-query -W -f='${{Status}} ${{Version}}' linux-headers-{release}")
    assert status.startswith("install ok installed"), status
    build = vm.ssh(f"readlink -f /lib/modules/{release}/build").strip()
    assert build == f"/usr/src/linux-headers-{release}", build
    # The steering program was compiled and attached at boot, with those headers.
    assert vm.ssh("systemctl show -P Result flyproxy.service").strip() == "success"
    assert "sk_lookup" in vm.ssh("sudo bpftool link show")


def test_the_packages_came_from_the_local_repository(vm):
    """The apt tasks really installed: the guest fetched them from the lab's repository."""
    fetched = (vm.workdir / "repo-http.log").read_text()
    for package in ("python3-bpfcc", "linux-headers-", "ansible-core"):
        assert re.search(rf'"GET /(\./)?{package}[^ ]*\.deb HTTP/1\.1" 200', fetched), package
    # The project's own package comes over the synced folder (build/), as a user's would.
    assert vm.ssh("dpkg-query -W -f='${Status}' flyproxy") == "install ok installed"


def test_status_and_bpf_status_show_the_steering(vm):
    status = json.loads(vm.ssh("sudo flyproxy status --json"))
    ports = sorted(p for app in status["apps"] for p in app["ports"])
    assert ports == sorted(DEMO_PORTS)
    bpf = vm.ssh("sudo flyproxy bpf status")
    for port in DEMO_PORTS:
        assert re.search(rf"\b{port}\b", bpf), bpf


def test_provisioning_again_changes_nothing(vm):
    again = vm.vagrant("provision", timeout=1800, phase="vagrant provision (again)")
    assert re.search(r"default\s*:\s*ok=\d+\s+changed=0\s+unreachable=0\s+failed=0",
                     again.stdout), again.stdout[-4000:]


def test_the_testinfra_suite_passes_against_the_vm(vm):
    ssh_config = vm.workdir / "ssh-config"
    ssh_config.write_text(vm.vagrant("ssh-config").stdout)
    started = time.monotonic()
    result = vm.enter([str(REPO / ".venv/bin/python"), "-m", "pytest", "-q", "-p",
                       "no:cacheprovider", str(REPO / "tests/infra")],
                      cwd=REPO, capture_output=True, text=True, timeout=1500, check=False,
                      env={**os.environ, "FLYPROXY_INFRA_SSH_CONFIG": str(ssh_config),
                           "FLYPROXY_INFRA_HOST": "default"})
    vm.timed("testinfra against the VM", started)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]


def test_reload_with_an_edited_config_keeps_serving(vm):
    pid = vm.ssh("systemctl show -P MainPID flyproxy.service").strip()
    with connect(6300, timeout=20, namespace=vm.ns.entered) as held:
        held.sendall(b"before\n")
        assert held.recv(64) == b"before\n"
        vm.ssh("sudo python3 -c \"import json; p = '/etc/flyproxy/config.json'; "
               "c = json.load(open(p)); c['Apps'][2]['Ports'].append(7500); "
               "json.dump(c, open(p, 'w'))\" && sudo systemctl reload flyproxy")
        held.sendall(b"after\n")
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b"after\n"  # the connection opened before the reload lives
    assert guest_echo(vm, 7500, "new port\\n") == "new port\n"
    assert "7500" in vm.ssh("sudo flyproxy bpf status")
    assert vm.ssh("systemctl show -P MainPID flyproxy.service").strip() == pid


def test_restart_keeps_serving(vm):
    pid = vm.ssh("systemctl show -P MainPID flyproxy.service").strip()
    vm.ssh("sudo systemctl restart --no-block flyproxy")
    # Connections made while the proxy restarts wait in the socket's backlog (systemd
    # keeps the listening socket) and are served by the new process.
    results: list[str] = []
    threads = [threading.Thread(target=lambda p=p: results.append(echo(vm, p, f"r {p}\n", 60)))
               for p in (5001, 6300, 7400)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert sorted(results) == ["r 5001\n", "r 6300\n", "r 7400\n"]
    # The old process drains (up to TimeoutStopSec) before the new one starts: wait,
    # bounded, in the guest, for the unit to be active again under a new main PID.
    vm.ssh("timeout 120 sh -c 'until systemctl is-active -q flyproxy && "
           f"[ \"$(systemctl show -P MainPID flyproxy)\" != {pid} ]; do sleep 1; done'", timeout=180)
    assert vm.ssh("systemctl show -P MainPID flyproxy.service").strip() not in ("", "0", pid)
    for port in DEMO_PORTS:
        assert echo(vm, port, f"after restart {port}\n") == f"after restart {port}\n"


def test_provisioning_a_new_package_version_keeps_an_open_connection(vm):
    """``vagrant provision`` with a newer package (tests/debs.py, named by FLYPROXY_DEB):
    the role's reload handler fires, not the restart one; the proxy moves to the new code
    under the same MainPID, and a connection open through a forwarded port all along
    comes through whole."""
    new = upgraded_deb()
    version = changelog_version() + SUFFIX
    pid = vm.ssh("systemctl show -P MainPID flyproxy.service").strip()
    vm.vagrant("rsync", timeout=600, phase="vagrant rsync (a newer package)")  # (provision does not)
    with connect(6300, timeout=20, namespace=vm.ns.entered) as held:
        held.sendall(b"before\n")
        assert held.recv(64) == b"before\n"
        run = vm.vagrant("provision", timeout=1800, phase="vagrant provision (a newer package)",
                         env={"FLYPROXY_DEB": f"/vagrant/{new.relative_to(REPO)}"})
        held.sendall(b"after\n")
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b"after\n"
    assert "RUNNING HANDLER [flyproxy : Reload flyproxy]" in run.stdout, run.stdout[-4000:]
    assert "Restart flyproxy" not in run.stdout
    assert vm.ssh("flyproxy --version").strip() == f"flyproxy {version}"
    assert json.loads(vm.ssh("sudo flyproxy status --json"))["version"] == version
    assert vm.ssh("systemctl show -P MainPID flyproxy.service").strip() == pid
    for port in DEMO_PORTS:
        assert echo(vm, port, f"upgraded {port}\n") == f"upgraded {port}\n"
