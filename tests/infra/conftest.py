"""Provision a booted Debian 12 container with the real playbook, then check it with testinfra.

The container (tests/container.py) has no network of its own; Ansible and testinfra reach
its sshd over SSH with a ProxyCommand that connects to 127.0.0.1:22 *inside* the
container's network namespace, so the traffic never leaves loopback.

With FLYPROXY_INFRA_SSH_CONFIG (and FLYPROXY_INFRA_HOST) set, the same checks run against
a host provisioned by someone else, over that SSH config, with sudo: tests/vm runs them
against the VM `vagrant up` made (`vagrant ssh-config`). The playbook tests, which drive
the playbook themselves, are then deselected: the VM test provisions again with vagrant.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from container import REPO, Container

ANSIBLE = REPO / "ansible"
HOST = "flyproxy-test"
OTHER_SSH_CONFIG = os.environ.get("FLYPROXY_INFRA_SSH_CONFIG")
OTHER_HOST = os.environ.get("FLYPROXY_INFRA_HOST", "default")


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if "tests/infra" in str(item.fspath)]
    for item in mine:
        item.add_marker(pytest.mark.systemd)
    if OTHER_SSH_CONFIG:  # not skipped: a skip fails a CI=true run (tests/conftest.py)
        drop = [item for item in mine if "provisioned" in item.fixturenames]
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if item not in drop]


class Provisioned:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.container = Container(f"flyproxy-infra-{uuid.uuid4().hex[:6]}", workdir / "console.log")
        key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        self.container.sh("mkdir -p -m 0700 /root/.ssh")
        self.container.write("/root/.ssh/authorized_keys", (workdir / "id_ed25519.pub").read_text())
        self.container.sh("chmod 0600 /root/.ssh/authorized_keys; systemctl start ssh.service")
        self.ssh_config = workdir / "ssh_config"
        self.ssh_config.write_text(
            f"Host {HOST}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            f"  ProxyCommand nsenter -t {self.container.leader} -n nc 127.0.0.1 22\n")
        self.inventory = workdir / "inventory.ini"
        self.inventory.write_text(
            f"[flyproxy]\n{HOST}\n\n[flyproxy:vars]\n"
            f"ansible_ssh_common_args=-F {self.ssh_config}\n"
            "ansible_python_interpreter=/usr/bin/python3\n"
            # The container has no network: every package is already in its rootfs.
            "flyproxy_apt_update_cache=false\nflyproxy_demo_echo=true\n")
        self.runs: list[subprocess.CompletedProcess] = []

    def playbook(self, *extra: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run(
            ["ansible-playbook", "-i", str(self.inventory), "site.yml", *extra],
            cwd=ANSIBLE, capture_output=True, text=True, timeout=900,
            env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
                 "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"})
        self.runs.append(result)
        if os.environ.get("FLYPROXY_PLAYBOOK_TIMES"):  # for NOTES: how long a run takes
            with open(os.environ["FLYPROXY_PLAYBOOK_TIMES"], "a") as f:
                tasks = len(re.findall(r"^TASK \[", result.stdout, re.M))
                f.write(f"{time.monotonic() - started:.1f} s, {tasks} tasks: "
                        f"{self.recap(result) if result.returncode == 0 else 'failed'}\n")
        return result

    @staticmethod
    def recap(result: subprocess.CompletedProcess) -> dict[str, int]:
        match = re.search(rf"^{HOST}\s*:\s*(.*)$", result.stdout, re.M)
        assert match, result.stdout + result.stderr
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


@pytest.fixture(scope="session")
def provisioned(tmp_path_factory):
    if OTHER_SSH_CONFIG:
        pytest.skip(f"checking {OTHER_HOST} over {OTHER_SSH_CONFIG}: provisioned by its owner")
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("ansible-playbook"):
        pytest.skip("needs root, systemd-nspawn and ansible-playbook")
    p = Provisioned(tmp_path_factory.mktemp("infra"))
    try:
        first = p.playbook()
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        yield p
    finally:
        p.container.stop()


@pytest.fixture(scope="session")
def host(request):
    import testinfra
    if OTHER_SSH_CONFIG:
        return testinfra.get_host(f"ssh://{OTHER_HOST}", ssh_config=OTHER_SSH_CONFIG, sudo=True)
    provisioned = request.getfixturevalue("provisioned")
    return testinfra.get_host(f"ssh://{HOST}", ssh_config=str(provisioned.ssh_config))


def echo_through(host, port: int, text: str) -> str:
    """``text`` sent to the host's own 127.0.0.1:port, and what came back (python3 rather
    than netcat: a VM has only what the appliance's package brought)."""
    return host.check_output(
        "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', %d), 5); "
        "s.sendall(b'%s'); s.shutdown(1); print(s.makefile().read(), end='')\"" % (port, text))


@pytest.fixture(scope="session")
def deployed_config(host) -> dict:
    return json.loads(host.file("/etc/flyproxy/config.json").content_string)


def configured_ports() -> list[int]:
    """The ports of the role's default config, for parametrizing."""
    import yaml
    defaults = yaml.safe_load((ANSIBLE / "roles/flyproxy/defaults/main.yml").read_text())
    return [p for app in defaults["flyproxy_config"]["Apps"] for p in app["Ports"]]
