"""Provision a booted Debian 12 container with the real playbook, then check it with testinfra.

The playbook reaches the container over SSH inside its own network namespace
(tests/playbook.py), so the traffic never leaves loopback.

With FLYPROXY_INFRA_SSH_CONFIG (and FLYPROXY_INFRA_HOST) set, the same checks run against
a host provisioned by someone else, over that SSH config, with sudo: tests/vm runs them
against the VM `vagrant up` made (`vagrant ssh-config`). The playbook tests, which drive
the playbook themselves, are then deselected: the VM test provisions again with vagrant.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from container import Container
from playbook import ANSIBLE, Hosts

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


class Provisioned(Hosts):
    """One container as the inventory's only host, with the demo's echo targets."""

    def __init__(self, workdir: Path):
        self.container = Container(f"flyproxy-infra-{uuid.uuid4().hex[:6]}",
                                   workdir / "console.log")
        try:
            super().__init__(workdir, {HOST: self.container}, flyproxy_demo_echo="true")
        except BaseException:
            self.container.stop()
            raise


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
