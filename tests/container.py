"""A real systemd to test against: a Debian 12 rootfs booted with systemd-nspawn.

The rootfs is built with debootstrap once and cached (``ROOTFS_CACHE``); a later
run on the same machine reuses it, a missing or half-built cache is rebuilt.
Each boot uses ``--volatile=overlay``, so nothing a test does reaches the cache,
and ``--private-network``, so the container has its own network namespace (its
own loopback, its own sk_lookup attachment) and cannot touch the host's ports.
nspawn's default seccomp filter refuses bpf() inside the container (EPERM, even
with every capability); ``--system-call-filter`` lets it and pidfd_getfd through,
as a VM would.

Tests talk to the container by running commands in it (``run``: nsenter into all
its namespaces) and by opening sockets in its network namespace (``entered``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from netns import entered_path

REPO = Path(__file__).resolve().parent.parent
MIRROR = os.environ.get("FLYPROXY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Everything the appliance needs at run time, plus what Ansible needs to manage a host
# (python3-apt, sudo, ssh). Installing them here keeps CI from downloading them per boot.
PACKAGES = [
    "systemd", "systemd-sysv", "dbus", "python3", "python3-jsonschema", "python3-systemd", "python3-prometheus-client",
    "python3-pycares", "python3-cffi-backend",  # (debootstrap resolves no virtual package)
    "python3-bpfcc", "bpftool", "iproute2", "netcat-openbsd", "linux-headers-amd64", "make",
    "openssh-server", "sudo", "python3-apt", "procps", "kmod", "util-linux",
]
_VERSION = hashlib.sha256(" ".join(PACKAGES).encode()).hexdigest()[:10]
ROOTFS_CACHE = Path(os.environ.get("FLYPROXY_ROOTFS_CACHE",
                                   f"/var/cache/flyproxy/rootfs-bookworm-{_VERSION}"))
BOOT_TIMEOUT_S = 180


def ensure_rootfs(path: Path = ROOTFS_CACHE) -> Path:
    """The cached Debian 12 rootfs, built now if missing (about 70 s and 1 GB)."""
    if (path / ".flyproxy-complete").exists():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                    "bookworm", str(tmp), MIRROR], check=True, stdout=subprocess.DEVNULL,
                   timeout=1800)
    (tmp / "etc/hostname").write_text("flyproxy-test\n")
    # No console login prompts or network setup waiting in a test container.
    for unit in ("getty@tty1.service", "console-getty.service"):
        mask = tmp / "etc/systemd/system" / unit
        mask.unlink(missing_ok=True)
        mask.symlink_to("/dev/null")
    subprocess.run(["chroot", str(tmp), "apt-get", "clean"], check=False)
    (tmp / ".flyproxy-complete").write_text(" ".join(PACKAGES) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    for old in path.parent.glob("rootfs-bookworm-*"):  # caches for other package lists
        if old != path:
            shutil.rmtree(old, ignore_errors=True)
    return path


class Container:
    """A booted systemd in a container; ``stop()`` (or the context manager) tears it down."""

    def __init__(self, name: str, log_path: Path, rootfs: Path | None = None,
                 binds: tuple[str, ...] = ()):
        self.name = name
        self.rootfs = rootfs or ensure_rootfs()
        self.log = open(log_path, "w")
        # nspawn gives the container a /sys without /sys/fs/bpf; a VM has it. Give the
        # container its own bpffs there, as a VM's systemd would mount it.
        self.bpffs = Path(f"/run/flyproxy-test/{name}-bpffs")
        self.bpffs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(self.bpffs)], check=True)
        binds = (f"--bind={self.bpffs}:/sys/fs/bpf", *binds)
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-b",
               "-D", str(self.rootfs), "--volatile=overlay", "--capability=all",
               "--private-network", "--system-call-filter=bpf pidfd_open pidfd_getfd", f"--machine={name}", f"--bind-ro={REPO}:/src/flyproxy",
               *binds]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.leader = self._find_leader()
            self._wait_for_bus()
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=BOOT_TIMEOUT_S).stdout.strip()
            if state not in ("running", "degraded"):
                raise RuntimeError(f"container {name} did not boot: {state}")
        except BaseException:
            self.stop()
            raise

    def _find_leader(self) -> int:
        """The container's PID 1 (systemd), a child of systemd-nspawn."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.proc.returncode}")
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if ppid == self.proc.pid and comm == "systemd":
                    # Wait until it has really become the container's systemd (own pid ns).
                    if os.readlink(f"/proc/{entry.name}/ns/pid") != os.readlink("/proc/self/ns/pid"):
                        return int(entry.name)
            time.sleep(0.1)  # polling /proc: there is no event for "child exec'd"
        raise RuntimeError("no systemd inside the container within 30 s")

    def _wait_for_bus(self) -> None:
        """systemctl needs systemd's private socket, which appears early in boot."""
        bus = Path(f"/proc/{self.leader}/root/run/systemd/private")
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not bus.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"container {self.name}: systemd never opened its bus")
            time.sleep(0.1)  # polling: no event tells us a file appeared in another mount ns

    def run(self, cmd: list[str], check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the container (all its namespaces), as root."""
        # the host's test settings (FLYPROXY_CONTROL: a test's own socket) stay outside: in
        # the container the appliance's defaults apply, as for an operator there
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYPROXY_")}
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", *cmd],
                                capture_output=True, text=True, timeout=timeout, input=input,
                                env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["sh", "-ec", script], **kw)

    def write(self, path: str, text: str) -> None:
        self.run(["sh", "-c", f"cat > {path}"], input=text)

    @property
    def netns(self) -> str:
        return f"/proc/{self.leader}/ns/net"

    def entered(self):
        """Sockets created in this block live in the container's network namespace."""
        return entered_path(self.netns)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        subprocess.run(["umount", str(self.bpffs)], check=False)
        with contextlib.suppress(OSError):
            self.bpffs.rmdir()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
