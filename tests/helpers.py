"""Test helpers: real sockets on loopback, real proxy processes, bounded waits.

Every wait here has a deadline and raises on expiry, so a broken proxy fails the
suite instead of hanging it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("FLYPROXY_TEST_PYTHON", sys.executable)
WAIT_S = 10.0  # the bound on any single wait for the proxy


def built_deb() -> Path:
    """The Debian package `make deb` built (``make test`` builds it first)."""
    debs = sorted((REPO / "build").glob("flyproxy_*_all.deb"))
    if not debs:
        raise AssertionError("no build/flyproxy_*_all.deb: run `make deb` first")
    return debs[-1]


def wait_until(predicate, what: str, timeout: float = WAIT_S):
    """Poll a state only another process changes (no event to wait on), bounded; returns
    the predicate's first true value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def fds_of(pid: int) -> list[str]:
    """What each open fd of process ``pid`` is (``socket:[..]``, ``pipe:[..]``, paths).

    An fd closed between the listing and its readlink (the process opened something
    for a moment: a module imported on first use, a notify socket) is left out."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return links


def pipes_of(pid: int) -> int:
    return sum(link.startswith("pipe:") for link in fds_of(pid))


_handed_out: collections.deque[tuple[str, int]] = collections.deque(maxlen=512)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free right now on ``host`` (kept bound until all are picked).

    A port handed out recently in this process is never handed out again: the kernel may
    offer a port again as soon as the probe closes it, and a test's "dead" target must not
    turn out to be the proxy's own listening port picked a moment before.
    """
    socks, ports = [], []
    try:
        for _ in range(64 * n):  # bounded: each try asks the kernel for another port
            if len(ports) == n:
                break
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            port = s.getsockname()[1]
            if (host, port) not in _handed_out:
                ports.append(port)
        assert len(ports) == n, f"no {n} fresh ports on {host}"
        _handed_out.extend((host, p) for p in ports)
        return ports
    finally:
        for s in socks:
            s.close()


def dead_port() -> int:
    """A loopback port where nothing listens: connecting is refused."""
    return free_ports(1)[0]


class TaggedBackend(socketserver.ThreadingTCPServer):
    """A backend that greets with ``<tag>\\n`` and then echoes until EOF (half-close aware)."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default accept queue is 5: a burst through the proxy overflowed it, and
    # the kernel then drops new SYNs (the proxy's connect retries after 1 s) or the
    # handshake's last ACK (the proxy is connected, but the backend sees the connection only
    # after a SYN-ACK retransmission finds room): 1 in ~400 burst connections waited past a
    # test's 10 s timeout.
    request_queue_size = 1024
    # A connection silent this long is closed (a hung test must not hold threads forever);
    # a test that holds idle connections longer (tests/fleet: through whole rollouts) sets more.
    idle_timeout_s = 60.0

    def __init__(self, tag: str, port: int = 0, host: str = "127.0.0.1"):
        self.tag = tag
        self.connections = 0
        self.eofs = 0  # connections whose client half-closed and were answered after
        super().__init__((host, port), _TaggedHandler)
        self.port = self.server_address[1]
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _TaggedHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: TaggedBackend = self.server  # type: ignore[assignment]
        server.connections += 1
        sock: socket.socket = self.request
        sock.settimeout(server.idle_timeout_s)
        try:
            sock.sendall(server.tag.encode() + b"\n")
            while data := sock.recv(65536):
                sock.sendall(data)
            server.eofs += 1
            sock.sendall(b"bye\n")  # written after the client's EOF: half-close works
        except OSError:
            pass


def write_config(path: Path, apps: dict[str, tuple[list[int], list[str]]]) -> Path:
    doc = {"Apps": [{"Name": name, "Ports": ports, "Targets": targets}
                    for name, (ports, targets) in apps.items()]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # atomic, as an operator's editor or Ansible would
    return path


def connect(port: int, host: str = "127.0.0.1", timeout: float = WAIT_S,
            namespace=None) -> socket.socket:
    """A connected socket; ``namespace`` (a context manager factory, e.g. NetNS.entered)
    creates it in another network namespace."""
    if namespace is None:
        s = socket.create_connection((host, port), timeout=timeout)
    else:
        with namespace():
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.settimeout(timeout)
        s.connect((host, port))
    s.settimeout(timeout)
    return s


def read_line(sock: socket.socket) -> bytes:
    """One ``\\n``-terminated line (without it); b'' if the peer closed first."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            return buf
        buf += chunk
    return buf[:-1]


def greet(port: int, host: str = "127.0.0.1", namespace=None) -> str:
    """Connect through the proxy and return the backend's tag; '' if the proxy closed us."""
    with connect(port, host, namespace=namespace) as s:
        return read_line(s).decode()


@contextlib.contextmanager
def scripted_backend(script):
    """A backend that runs ``script(conn)`` on its first connection, in a thread.

    Yields its ``127.0.0.1:PORT`` address; joins the thread (bounded) and closes on exit.
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(WAIT_S)

    def run():
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            try:
                script(conn)
            except OSError:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        srv.close()
        thread.join(WAIT_S)


def closed_by_peer(sock: socket.socket) -> bool:
    """Did the peer close (EOF) or reset the connection? (False if it sent data instead.)"""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def refused(port: int, host: str = "127.0.0.1") -> bool:
    """Does the proxy close (or reset) a new connection to ``port`` at once, as over a
    limit? (A reset may come before connect() returns, on loopback.)"""
    try:
        s = connect(port, host)
    except ConnectionResetError:
        return True
    with s:
        return closed_by_peer(s)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


class NotifySocket:
    """A stand-in for systemd's notify socket: collects sd_notify messages from the proxy.

    A thread reads every datagram as it comes (as systemd does): the socket's queue (10
    datagrams) never fills while a test is busy elsewhere, which would make the proxy drop
    its messages."""

    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []  # every message, in order
        self._seen = 0  # messages wait_for has looked at
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096).decode()
            except OSError:
                return  # closed
            msg = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            with self._cond:
                self.messages.append(msg)
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = WAIT_S) -> dict:
        """The next message (after those already looked at) that sets ``key`` (to ``value``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._seen < len(self.messages):
                    msg = self.messages[self._seen]
                    self._seen += 1
                    if key in msg and (value is None or msg[key] == value):
                        return msg
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no sd_notify {key}={value or '*'} within {timeout}s; "
                                       f"got {self.messages}")
                self._cond.wait(remaining)

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return  # closed already
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(WAIT_S)


class ProxyProcess:
    """``flyproxy serve`` in a subprocess, ready when it has sent READY=1."""

    _instances = 0

    def __init__(self, config: Path, *args: str, pass_fds: tuple[int, ...] = (),
                 env: dict | None = None, host: str | None = "127.0.0.1",
                 wrap: list[str] | None = None, preexec_fn=None):
        self.config = config
        self.notify = NotifySocket(config.parent)
        cmd = [PYTHON, "-m", "appliance", "--log-level", "debug", "serve", "-c", str(config),
               "--connect-timeout", "1"]
        if host:
            cmd += ["--host", host]
        if "--control" not in args:  # serve opens one by default: each proxy its own, the
            control = config.parent / "control.sock"  # first in a directory the test's default
            if control.exists():
                ProxyProcess._instances += 1
                control = config.parent / f"control-{ProxyProcess._instances}.sock"
            cmd += ["--control", str(control)]
        cmd = (wrap or []) + cmd + list(args)
        self.log_path = config.parent / "proxy.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, pass_fds=pass_fds,
            preexec_fn=preexec_fn, start_new_session=True,  # its workers too: see stop()
            env={**os.environ, **(env or {}), "NOTIFY_SOCKET": self.notify.path,
                 "PYTHONPATH": str(REPO)})
        try:
            self.notify.wait_for("READY", "1")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"proxy did not become ready:\n{self.output()}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def reload(self) -> dict:
        """SIGHUP, then wait for the proxy to report it is ready again; returns that message."""
        self.proc.send_signal(signal.SIGHUP)
        self.notify.wait_for("RELOADING", "1")
        return self.notify.wait_for("READY", "1")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT_S) -> int:
        return self.proc.wait(timeout)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        """Kill the proxy and any worker processes it started (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)
        self.log.close()
        self.notify.close()


def run_cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "appliance", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **kw.pop("env", {})}, **kw)


def copy_of_the_code(tmp_path: Path) -> Path:
    """A copy of the package to run a proxy from, so a test can change the code "on disk"
    (an upgrade, a broken install) under a running proxy."""
    import shutil

    root = tmp_path / "code"
    shutil.copytree(REPO / "appliance", root / "appliance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def run_from(root: Path) -> list[str]:
    """A wrap for ProxyProcess: ``python -m appliance`` finds the package in the working
    directory first, so the proxy runs the code under ``root``."""
    return ["sh", "-c", f'cd "{root}" && exec "$@"', "sh"]


def scrape(port: int) -> str:
    """The metrics endpoint's text, fetched (bounded)."""
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels) -> float:
    """The value of the sample ``name`` with exactly these labels (in any order)."""
    import re
    for line in text.splitlines():
        match = re.match(r"(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if have == {k: str(v) for k, v in labels.items()}:
                return float(match.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


def status_of(control: str) -> dict:
    """`flyproxy status --json` of the proxy at ``control``."""
    out = run_cli("status", "--control", control, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)
