"""A real ``vagrant up`` on this machine: libvirt + qemu, kept inside a namespace of its own.

- ``ensure_box()``: the Debian 12 box and the local apt repository its VMs install from
  (``build-box.sh``), cached under /var/cache/flyproxy keyed by their inputs.
- ``Lab``: a network namespace (vagrant-libvirt's management network, 192.168.121.0/24,
  exists only there) and a private mount namespace (libvirt's /etc, /run, /var/lib and
  /var/log are directories of the lab's own), with libvirtd, the repository's web server
  and every vagrant command running inside them. ``close()`` destroys the VM, kills
  every process left in the namespace, deletes it and the lab's files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
from helpers import wait_until  # noqa: E402
from netns import NetNS  # noqa: E402

MIRROR = os.environ.get("FLYPROXY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("FLYPROXY_VM_CACHE", "/var/cache/flyproxy"))
BOX_NAME = "debian/bookworm64"  # what the project's Vagrantfile asks for
REPO_PORT = 8765  # build-box.sh points the box's apt at 192.168.121.1:8765
LIBVIRT_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt",
                "/var/cache/libvirt")


def box_key() -> str:
    """The box's inputs: its build script and the package's dependencies (the repository)."""
    h = hashlib.sha256()
    for path in (HERE / "build-box.sh", REPO / "debian/control"):
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def ensure_box(deb: Path) -> Path:
    """The cached box directory (flyproxy-bookworm.box, repo/), built now if missing."""
    out = CACHE / f"vm-bookworm-{box_key()}"
    if (out / "complete").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(HERE / "build-box.sh"), str(out), MIRROR, str(deb)],
                   check=True, timeout=1800)
    for old in CACHE.glob("vm-bookworm-*"):  # boxes for other inputs
        if old != out and not old.name.endswith(".partial"):
            shutil.rmtree(old, ignore_errors=True)
    return out


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    """helpers.wait_until, failing at once if ``proc`` (what should make it true) exits."""
    def check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        return predicate()
    wait_until(check, what, timeout)


class Lab:
    def __init__(self, workdir: Path, box: Path):
        self.workdir = workdir
        self.box = box
        self.procs: list[subprocess.Popen] = []
        self.times: list[tuple[str, float]] = []
        self.ns = NetNS("flyproxy-vm")
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # -- namespaces and daemons ------------------------------------------------------
    def _start(self) -> None:
        # The holder: a process in the network namespace with a mount namespace of its
        # own; everything else enters both (nsenter -t holder -m -n).
        self.holder = subprocess.Popen(
            self.ns.command(["unshare", "--mount", "--propagation", "private",
                             "sleep", "infinity"]), start_new_session=True)
        self.procs.append(self.holder)
        _wait(lambda: Path(f"/proc/{self.holder.pid}/comm").read_text().strip() == "sleep",
              10, "namespace holder", self.holder)
        for directory in LIBVIRT_DIRS:
            mine = self.workdir / directory.strip("/").replace("/", "-")
            if directory == "/etc/libvirt":
                shutil.copytree(directory, mine)
            else:
                mine.mkdir(parents=True)
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.enter(["mount", "--bind", str(mine), directory])
        # libvirt resolves its built-in default user (libvirt-qemu) before it reads
        # qemu.conf; that user comes with libvirt-daemon-system. Give this mount namespace
        # a passwd and group that have it, and run qemu as root anyway.
        for name, line in (("passwd", "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin"),
                           ("group", "libvirt-qemu:x:64055:")):
            mine = self.workdir / name
            mine.write_text(Path(f"/etc/{name}").read_text() + line + "\n")
            self.enter(["mount", "--bind", str(mine), f"/etc/{name}"])
        etc = self.workdir / "etc-libvirt"
        # No libvirt-qemu user (libvirt-daemon-system is not installed, on purpose: it
        # brings a default network that starts on the host), no cgroups, no virtlogd.
        with open(etc / "qemu.conf", "a") as f:
            f.write('\nuser = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
                    'cgroup_controllers = [ ]\nstdio_handler = "file"\n')
        with open(etc / "libvirtd.conf", "a") as f:
            f.write('\nauth_unix_rw = "none"\nunix_sock_group = "root"\n')
        self.libvirtd = self.spawn(["libvirtd"],
                                   "libvirtd.log")
        sock = Path(f"/proc/{self.holder.pid}/root/run/libvirt/libvirt-sock")
        _wait(sock.exists, 60, "libvirtd's socket", self.libvirtd)
        self.spawn([sys.executable, "-m", "http.server", str(REPO_PORT), "--bind", "0.0.0.0",
                    "--directory", str(self.box / "repo")], "repo-http.log")
        self.vagrant_home = self.workdir / "vagrant.d"
        self.env = {**os.environ, "VAGRANT_HOME": str(self.vagrant_home),
                    "VAGRANT_DOTFILE_PATH": str(self.workdir / "dot-vagrant"),
                    "VAGRANT_DEFAULT_PROVIDER": "libvirt", "VAGRANT_CHECKPOINT_DISABLE": "1",
                    "VAGRANT_NO_COLOR": "1", "LIBVIRT_DEFAULT_URI": "qemu:///system"}

    def enter(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the lab's network and mount namespaces."""
        kw.setdefault("timeout", 60)
        kw.setdefault("check", True)
        # Entering a mount namespace moves to its root: name the directory again.
        wd = [f"--wd={kw.pop('cwd')}"] if "cwd" in kw else []
        return subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "-n", *wd, "--", *cmd],
                              **kw)

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.workdir / log, "w")
        proc = subprocess.Popen(["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *cmd],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    # -- vagrant ---------------------------------------------------------------------
    def vagrant(self, *args: str, timeout: float = 600, check: bool = True,
                phase: str | None = None, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
        """``vagrant ARGS`` in the checkout, in the lab (``env``: more variables for the
        Vagrantfile); its output also goes to vagrant.log."""
        started = time.monotonic()
        # Its output goes to vagrant.log as it comes (a long `up` can be followed there),
        # stderr kept apart for the result.
        log = self.workdir / "vagrant.log"
        with open(log, "a") as f:
            f.write(f"$ vagrant {' '.join(args)}\n")
            offset = f.tell()
        with open(log, "a") as out:
            result = self.enter(["vagrant", *args], cwd=REPO, env={**self.env, **(env or {})},
                                stdout=out,
                                stderr=subprocess.PIPE, text=True, timeout=timeout, check=False)
        with open(log) as f:
            f.seek(offset)
            result.stdout = f.read()
        with open(log, "a") as f:
            f.write(f"{result.stderr}-> exit {result.returncode}\n")
        if phase:
            self.times.append((phase, time.monotonic() - started))
        if check and result.returncode != 0:
            raise AssertionError(f"vagrant {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}")
        return result

    def ssh(self, command: str, timeout: float = 120, check: bool = True) -> str:
        result = self.vagrant("ssh", "-c", command, "--", "-q", timeout=timeout, check=check)
        return result.stdout

    def timed(self, phase: str, started: float) -> None:
        self.times.append((phase, time.monotonic() - started))

    # -- teardown --------------------------------------------------------------------
    def _namespace_pids(self) -> list[int]:
        try:
            mine = os.stat(f"/run/netns/{self.ns.name}").st_ino
        except OSError:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if os.stat(entry / "ns/net").st_ino == mine:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            try:
                self.vagrant("destroy", "-f", timeout=300, check=False)
            except subprocess.TimeoutExpired:
                pass
        # libvirtd by PID, then whatever is left in the namespace (qemu, dnsmasq, the ssh
        # port forwards, the web server): all of it was started by this lab.
        for _ in range(3):
            pids = self._namespace_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)  # let the kernel reap them before looking again
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.ns.delete()
        if os.environ.get("FLYPROXY_VM_KEEP") != "1":  # 1: keep the logs, for debugging
            shutil.rmtree(self.workdir, ignore_errors=True)
