"""The real playbook (ansible/site.yml) run over SSH against booted containers.

Each container (tests/container.py) has no network of its own reachable from here; Ansible
reaches its sshd with a ProxyCommand that connects to 127.0.0.1:22 *inside* the
container's network namespace, so the traffic never leaves loopback. One key, one SSH
config with a Host entry per container, one inventory with them all in group
``flyproxy``: tests/infra provisions one host this way, tests/fleet three.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from container import REPO, Container

ANSIBLE = REPO / "ansible"


class Hosts:
    """``containers`` (inventory name -> booted container) as Ansible's group flyproxy."""

    def __init__(self, workdir: Path, containers: dict[str, Container], **group_vars: str):
        self.workdir = workdir
        self.containers = containers
        key = workdir / "id_ed25519"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        entries = []
        for name, c in containers.items():
            c.sh("mkdir -p -m 0700 /root/.ssh")
            c.write("/root/.ssh/authorized_keys", (workdir / "id_ed25519.pub").read_text())
            c.sh("chmod 0600 /root/.ssh/authorized_keys; systemctl start ssh.service")
            entries.append(
                f"Host {name}\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n"
                "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
                f"  ProxyCommand nsenter -t {c.leader} -n nc 127.0.0.1 22\n")
        self.ssh_config = workdir / "ssh_config"
        self.ssh_config.write_text("".join(entries))
        self.inventory = workdir / "inventory.ini"
        # The containers have no network: every package is already in their rootfs.
        group_vars = {"ansible_ssh_common_args": f"-F {self.ssh_config}",
                      "ansible_python_interpreter": "/usr/bin/python3",
                      "flyproxy_apt_update_cache": "false", **group_vars}
        self.inventory.write_text(
            "[flyproxy]\n" + "".join(f"{name}\n" for name in containers)
            + "\n[flyproxy:vars]\n" + "".join(f"{k}={v}\n" for k, v in group_vars.items()))
        self.runs: list[subprocess.CompletedProcess] = []

    def playbook(self, *extra: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        result = subprocess.run(
            ["ansible-playbook", "-i", str(self.inventory), "site.yml", *extra],
            cwd=ANSIBLE, capture_output=True, text=True, timeout=900,
            env={**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
                 "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"})
        result.wall_s = time.monotonic() - started
        self.runs.append(result)
        if os.environ.get("FLYPROXY_PLAYBOOK_TIMES"):  # for NOTES: how long a run takes
            with open(os.environ["FLYPROXY_PLAYBOOK_TIMES"], "a") as f:
                tasks = len(re.findall(r"^TASK \[", result.stdout, re.M))
                recap = self.recap(result) if result.returncode == 0 else "failed"
                f.write(f"{result.wall_s:.1f} s, {tasks} tasks: {recap}\n")
        return result

    def recap(self, result: subprocess.CompletedProcess,
              host: str | None = None) -> dict[str, int] | None:
        """The PLAY RECAP counts of ``host`` (the only host when None); None if the run
        never reached it."""
        host = host or next(iter(self.containers))
        match = re.search(rf"^{re.escape(host)}\s*:\s*(.*)$", result.stdout, re.M)
        if match is None:
            assert "PLAY RECAP" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
            return None
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}
