#!/usr/bin/env python3
"""`make bench`: flyproxy side by side with HAProxy, nginx stream and systemd-socket-proxyd.

Everything runs inside a network namespace made for the run (loopback only), with the
same backends for every proxy: nginx serving a tiny HTTP response, an iperf3 server, and
an echo server for idle connections. Proxies run one after another, in several rounds
(alternating, so drift on a noisy machine hits all of them alike; each round starts one
proxy later in the list, so none always follows the same one), and every figure is the
median over rounds (latency percentiles: over every round's samples pooled). Wall-clock
rates swing on shared machines; the CPU each proxy spends per unit of work (its own
processes' user+sys time) barely does, so both are reported.

Then the scale phase (hold.py): HOLD (100,000) concurrent connections through flyproxy
(per-port and BPF mode, as shipped) and HAProxy, one proxy after another: how many are held,
the open rate, memory and CPU per connection, and a reload, a restart and an upgrade
with all of them open (flyproxy runs from a copy of its package whose version the bench
bumps, then `flyproxy reload`; HAProxy's upgrade is its master-worker reload).

Outputs docs/bench/results.md (absolute figures, ratios to HAProxy, and for each row in
how many rounds each flyproxy column beat systemd-socket-proxyd), results.json
(every round) and chart.png. Needs root (namespace, BPF). Bounded: each load lasts
BENCH_SECONDS (default 4) and there are BENCH_ROUNDS rounds (default 5).

Between the two, the access log phase: new conn/s and CPU per connection through flyproxy
with its access log on (the default), sampled (--conn-log-sample 10) and off, side by side.

BENCH_ONLY=scale runs the scale phase alone (BENCH_HOLD connections; its own size knob)
and puts its table into the results already in BENCH_OUT (default docs/bench), leaving the
rounds' figures as they were; BENCH_ONLY=access-log does the same for the access log phase
(about two minutes).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flood
import hold

REPO = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("BENCH_OUT", REPO / "docs" / "bench"))
ONLY = os.environ.get("BENCH_ONLY", "")  # one phase alone: "scale", "access-log" or "flood"
SCALE_ONLY = ONLY == "scale"
# the phases that can run alone: BENCH_ONLY's value -> their key in results.json, and the
# words their failures carry ("<proxy>, <words>: why")
PHASES = {"scale": ("scale", "scale phase"), "access-log": ("access_log", "access log phase"),
          "flood": ("flood", "flood phase")}
PYTHON = os.environ.get("BENCH_PYTHON", "/usr/bin/python3")
SECONDS = float(os.environ.get("BENCH_SECONDS", "4"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
IDLE_CONNECTIONS = int(os.environ.get("BENCH_IDLE", "5000"))
SCALE_PORTS = 10_000
HOLD = int(os.environ.get("BENCH_HOLD", "100000"))  # the scale phase's connections (0: skip)
HOLD_GRACE_S = 5  # flyproxy's --grace-period in the scale phase: a restart drains this long
NS = "flyproxy-bench"
PROXYD = "/lib/systemd/systemd-socket-proxyd"

BACKEND = {"http": 8080, "iperf": 5201, "idle": 7070}
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORK: Path  # the run's own directory (configs, logs, bpffs), made by main(): importing makes none


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes and measurements ---------------------------------------------------------

def spawn(cmd: list[str], name: str, **kw) -> subprocess.Popen:
    out = open(WORK / f"{name}.log", "a")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)


def listening(port: int) -> bool:
    """Is a TCP socket listening on ``port`` (read from /proc: no connection is made,
    which would count as a test for iperf3's server)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        time.sleep(0.05)  # polling a port someone else opens: no event to wait on
    raise RuntimeError(f"nothing listens on {port} after {timeout}s; logs in {WORK}")


def echoes(port: int) -> bool:
    """Does a new connection to ``port`` echo a byte (within 2 s)?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"?")
            return s.recv(1) == b"?"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# -- the proxies -------------------------------------------------------------------------

class Proxy:
    """A proxy under test: front ports for each backend, its processes, start/stop."""

    name = "?"

    def __init__(self, base: int):
        self.front = {"http": base, "iperf": base + 1, "idle": base + 2}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        pids = [p.pid for p in self.procs if p.poll() is None]
        return pids + [c for p in pids for c in children(p)]

    def ready(self) -> None:
        for port in self.front.values():
            wait_port(port)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs = []


class NoProxy(Proxy):
    name = "no proxy"

    def __init__(self):
        super().__init__(0)
        self.front = dict(BACKEND)

    def start(self) -> None:
        pass


class HAProxy(Proxy):
    name = "HAProxy"

    def __init__(self, base: int, threads: int = 1):
        super().__init__(base)
        self.threads = threads
        if threads > 1:
            self.name = f"HAProxy ({threads} threads)"

    def start(self) -> None:
        cfg = WORK / "haproxy.cfg"
        sections = "".join(f"listen {k}\n    bind 127.0.0.1:{self.front[k]}\n"
                           f"    server s1 127.0.0.1:{BACKEND[k]}\n" for k in BACKEND)
        cfg.write_text(f"""global
    nbthread {self.threads}
    maxconn 9000
defaults
    mode tcp
    maxconn 9000
    timeout connect 5s
    timeout client 300s
    timeout server 300s
{sections}""")
        self.procs = [spawn(["haproxy", "-db", "-f", str(cfg)], self.name.replace(" ", "-"))]


class HAProxyHold(HAProxy):
    """HAProxy for the scale phase: the idle front balanced over the hold backends, in
    master-worker mode (-W): a reload (SIGUSR2) starts a new worker and leaves the old one
    its connections (soft stop), HAProxy's own way to apply a config. One process (each
    with ``threads`` threads) unless the fd limit per process is too low for all the
    connections: then ``instances`` of it bind the same port (HAProxy sets SO_REUSEPORT)
    and the kernel spreads connections over them."""

    def __init__(self, base: int, threads: int, instances: int = 1, maxconn: int = 250_000):
        super().__init__(base, threads)
        self.instances, self.maxconn = instances, maxconn
        self.retired: set[int] = set()  # workers that a reload told to finish
        if instances > 1:
            self.name += f" x {instances} processes"

    def start(self) -> None:
        cfg = WORK / "haproxy-hold.cfg"
        servers = "".join(f"    server s{i} {host}:{port}\n"
                          for i, (host, port) in enumerate(hold.backends(), 1))
        cfg.write_text(f"""global
    nbthread {self.threads}
    maxconn {self.maxconn}
defaults
    mode tcp
    maxconn {self.maxconn}
    timeout connect 5s
    timeout client 600s
    timeout server 600s
listen idle
    bind 127.0.0.1:{self.front['idle']}
    balance roundrobin
{servers}""")
        self.procs = [spawn(["haproxy", "-W", "-db", "-f", str(cfg)], f"haproxy-hold-{i}")
                      for i in range(self.instances)]

    def workers(self) -> set[int]:
        return {c for p in self.procs for c in children(p.pid)}

    def ready(self) -> None:
        wait_port(self.front["idle"])
        self.wait_workers(set())

    def wait_workers(self, old: set[int], timeout: float = 30) -> None:
        """Every master has a worker that is not one of ``old``, and the port answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(set(children(p.pid)) - old for p in self.procs) and echoes(self.front["idle"]):
                return
            time.sleep(0.05)  # polling other processes' state, bounded
        raise RuntimeError(f"{self.name}: no new worker after {timeout}s; logs in {WORK}")

    def reload(self, pin_dir: str = "") -> float:
        old = self.workers()
        started = time.monotonic()
        for p in self.procs:
            os.kill(p.pid, signal.SIGUSR2)
        self.wait_workers(old)
        self.retired |= old
        return time.monotonic() - started

    def upgrade(self) -> float:
        """HAProxy's documented reload without dropping connections is its upgrade too: on
        SIGUSR2 the master re-executes the binary on disk and starts new workers; the old
        ones stop accepting and keep their connections (no hard-stop-after here)."""
        return self.reload()

    def drained(self, timeout: float = 120) -> None:
        """Every old worker has exited (their connections ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.workers() & self.retired:
                return
            time.sleep(0.1)  # polling other processes' state, bounded
        raise RuntimeError(f"{self.name}: old workers still there after {timeout}s")

    def restart(self) -> tuple[float, float]:
        t0 = time.monotonic()
        self.stop()
        t1 = time.monotonic()
        self.start()
        self.ready()
        return t1 - t0, time.monotonic() - t1


class NginxStream(Proxy):
    name = "nginx stream"

    def start(self) -> None:
        cfg = WORK / "nginx-proxy.conf"
        servers = "".join(f"    server {{ listen 127.0.0.1:{self.front[k]} backlog=4096; "
                          f"proxy_pass 127.0.0.1:{BACKEND[k]}; }}\n" for k in BACKEND)
        cfg.write_text(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {WORK}/nginx-proxy.pid;
error_log {WORK}/nginx-proxy-error.log;
events {{ worker_connections 12000; }}
stream {{
{servers}}}
""")
        self.procs = [spawn(["nginx", "-c", str(cfg)], "nginx-proxy")]


class SocketProxyd(Proxy):
    name = "systemd-socket-proxyd"

    def start(self) -> None:
        # restore_signals=False: the child keeps Python's ignored SIGPIPE, as any systemd
        # unit has it (IgnoreSIGPIPE=yes is the default). socket-proxyd does not ignore it
        # itself: spawned with the default, a write to a closed peer killed it (-13) in about
        # one iperf3 round in ten, and the round was lost.
        self.procs = [spawn(["systemd-socket-activate", "-l", f"127.0.0.1:{self.front[k]}",
                             PROXYD, "--connections-max=9000", f"127.0.0.1:{BACKEND[k]}"],
                            f"proxyd-{k}", restore_signals=False) for k in BACKEND]


def describe_workers(workers: str) -> str:
    """"" for one worker (the like-for-like column), else " (N workers)"."""
    n = os.cpu_count() if workers == "auto" else int(workers)
    return "" if n == 1 else f" ({n} workers)"


class FlyProxy(Proxy):
    name = "flyproxy"

    def __init__(self, base: int, loop: str = "auto", workers: str = "1",
                 target_host: str = "127.0.0.1", netns_exec: bool = False,
                 log_level: str = "warning", options: tuple[str, ...] = ()):
        super().__init__(base)
        self.loop, self.workers = loop, workers
        self.log_level = log_level  # (at warning, the access log writes no line)
        self.options = list(options)  # more serve options
        self.name = "flyproxy" + describe_workers(workers)
        if loop == "uvloop":
            self.name += " (uvloop)"
        self.config = WORK / f"flyproxy-{base}.json"
        self.target_host = target_host  # a host name: answered by the bench's resolver
        self.hold_targets: list[str] = []  # the scale phase: the idle app goes to these
        self.grace: float | None = None  # --grace-period (None: the shipped default)
        # the scale phase: run from a copy of the package here, so an upgrade is a real
        # change of the code on disk (as a package upgrade makes it)
        self.code_root: Path | None = None
        self.upgrades = 0
        # run under `ip netns exec`, which gives it the namespace's resolv.conf (see DNS)
        self.wrap = ["ip", "netns", "exec", NS] if netns_exec else []

    def write_config(self, extra_http_ports: int = 0) -> None:
        apps = [{"Name": k, "Ports": [self.front[k]],
                 "Targets": [f"{self.target_host}:{BACKEND[k]}"]} for k in BACKEND]
        if self.hold_targets:
            apps[2]["Targets"] = self.hold_targets
        if extra_http_ports:  # below the ephemeral range (32768+) and clear of every other port
            apps[0]["Ports"] += list(range(10_000, 10_000 + extra_http_ports))
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps({"Apps": apps}))
        tmp.replace(self.config)

    def serve_args(self) -> list[str]:
        return ["--host", "127.0.0.1"]

    def start(self) -> None:
        self.copy_code()
        self.write_config()
        self.serve()

    def copy_code(self) -> None:
        if self.code_root is not None:
            shutil.rmtree(self.code_root, ignore_errors=True)
            shutil.copytree(REPO / "appliance", self.code_root / "appliance",
                            ignore=shutil.ignore_patterns("__pycache__"))

    def serve(self) -> None:
        grace = ["--grace-period", str(self.grace)] if self.grace is not None else []
        self.procs = [spawn([*self.wrap, PYTHON, "-m", "appliance", "--log-level",
                             self.log_level, "serve", *self.options,
                             "-c", str(self.config), "--loop", self.loop,
                             "--workers", self.workers, *grace,
                             "--control", str(WORK / f"control-{self.front['http']}.sock"),
                             # as shipped: metrics on (the appliance unit turns them on)
                             "--metrics", f"127.0.0.1:{self.front['http'] + 9}",
                             *self.serve_args()], self.name.replace(" ", "-"),
                            cwd=self.code_root or REPO,  # `-m appliance` finds the copy first
                            pass_fds=self.pass_fds())]

    def pass_fds(self) -> tuple[int, ...]:
        return ()

    def restart(self) -> tuple[float, float]:
        """Stop (SIGTERM: open connections drain for the grace period, then are ended) and
        start again on the same config: (seconds to stop, seconds until serving again)."""
        t0 = time.monotonic()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait((self.grace or 30) + 30)
        t1 = time.monotonic()
        self.serve()
        self.ready()
        return t1 - t0, time.monotonic() - t1

    def ready(self) -> None:
        super().ready()
        self.wait_workers()

    def status(self) -> dict | None:
        """`flyproxy status --json`, or None while it does not answer."""
        out = subprocess.run([PYTHON, "-m", "appliance", "status", "--json", "--control",
                              str(WORK / f"control-{self.front['http']}.sock")],
                             cwd=REPO, capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait_workers(self, timeout: float = 30) -> None:
        """Every worker serving (the ports listen as soon as the first one has bound them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and all(w["ready"] for w in status.get("workers", [])):
                return
            time.sleep(0.1)  # polling another process's state, bounded
        raise RuntimeError(f"{self.name}: workers not ready after {timeout}s; logs in {WORK}")

    def reload(self, pin_dir: str = "") -> float:
        return self._reload(pin_dir)[0]

    def _reload(self, pin_dir: str) -> tuple[float, str]:
        """`flyproxy reload`: (seconds it took, what it said)."""
        started = time.monotonic()
        result = subprocess.run([PYTHON, "-m", "appliance", "reload", "-c", str(self.config),
                                 "--control", str(WORK / f"control-{self.front['http']}.sock"),
                                 "--pin-dir", pin_dir], cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{self.name}: reload failed: {result.stderr}")
        return time.monotonic() - started, result.stdout

    def upgrade(self, pin_dir: str = "") -> float:
        """New code on disk (the copy's ``__version__`` bumped), then `flyproxy reload`: a
        new generation of workers serves, the old one drains. Seconds the reload took."""
        self.upgrades += 1
        init = self.code_root / "appliance" / "__init__.py"
        init.write_text(re.sub(r'^__version__ = "([^"]+)"',
                               rf'__version__ = "\1+bench{self.upgrades}"', init.read_text(),
                               count=1, flags=re.M))
        took, said = self._reload(pin_dir)
        if "upgraded to" not in said:
            raise RuntimeError(f"{self.name}: the reload did not upgrade: {said.strip()}")
        return took

    def drained(self, timeout: float = 120) -> None:
        """Only the newest worker generation is left (the old ones' connections ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status is not None and len(status.get("generations", [])) == 1:
                return
            time.sleep(0.2)  # polling another process's state, bounded
        raise RuntimeError(f"{self.name}: old worker generations left after {timeout}s")


class FlyProxyBPF(FlyProxy):
    name = "flyproxy BPF"
    LISTEN = 9999  # outside every range of configured ports

    def __init__(self, base: int, bpffs: Path, workers: str = "1"):
        super().__init__(base, workers=workers)
        self.name = "flyproxy BPF" + describe_workers(workers)
        self.pin_dir = bpffs / "flyproxy"
        self.listener: socket.socket | None = None

    def serve_args(self) -> list[str]:
        return ["--fd", str(self.listener.fileno())]

    def pass_fds(self) -> tuple[int, ...]:
        return (self.listener.fileno(),)

    def start(self) -> None:
        self.copy_code()
        # The listening socket is the bench's, as the appliance's is systemd's (its socket
        # unit): it outlives a restart of the proxy, and connections queue in it meanwhile.
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.LISTEN))
        self.listener.listen(4096)
        self.write_config()
        subprocess.run([PYTHON, "-m", "appliance", "bpf", "load", "-c", str(self.config),
                        "--pin-dir", str(self.pin_dir)], cwd=REPO, check=True, capture_output=True)
        self.serve()

    def serve(self) -> None:
        super().serve()
        self.wait_workers()  # then the workers' group exists too
        subprocess.run([PYTHON, "-m", "appliance", "bpf", "register", "--pid",
                        str(self.procs[0].pid), "--port", str(self.LISTEN), "--spread",
                        "--control", str(WORK / f"control-{self.front['http']}.sock"),
                        "--pin-dir", str(self.pin_dir)],
                       cwd=REPO, check=True, capture_output=True)

    def ready(self) -> None:
        wait_port(self.LISTEN)  # the app ports are steered: nothing else listens
        self.wait_workers()

    def reload(self, pin_dir: str = "") -> float:
        return super().reload(str(self.pin_dir))

    def upgrade(self, pin_dir: str = "") -> float:
        return super().upgrade(str(self.pin_dir))

    def stop(self) -> None:
        super().stop()
        subprocess.run([PYTHON, "-m", "appliance", "bpf", "unload", "--pin-dir",
                        str(self.pin_dir)], cwd=REPO, capture_output=True)
        if self.listener is not None:
            self.listener.close()
            self.listener = None


# -- workloads ---------------------------------------------------------------------------

def iperf(port: int, streams: int, attempts: int = 3) -> tuple[float, float]:
    """(Gbit/s, GB moved) for one iperf3 run through ``port``.

    iperf3's server takes one test at a time and needs a moment between tests; a run that
    finds it busy is retried (at most ``attempts`` times)."""
    for attempt in range(attempts):
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{SECONDS:g}",
                              "-P", str(streams), "-J"], capture_output=True, text=True,
                             timeout=SECONDS + 30)
        data = json.loads(out.stdout)
        if "error" not in data:
            break
        log(f"iperf3 through port {port}: {data['error']} (attempt {attempt + 1})")
        time.sleep(1)  # a backoff: iperf3 signals nothing when its server can take a test again
    else:
        raise RuntimeError(f"iperf3 through port {port} failed {attempts} times")
    received = data["end"]["sum_received"]
    return received["bits_per_second"] / 1e9, received["bytes"] / 1e9


def wrk(port: int, close: bool, connections: int = 50) -> tuple[float, int]:
    """(requests/s, requests) for one wrk run; with ``close`` every request is a new connection."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{SECONDS:g}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    out = subprocess.run(cmd + [f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=SECONDS + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Socket errors: .*", out)
    if errors:
        log(f"wrk on {port}: {errors.group(0)}")
    return rate, total


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(int(len(sorted_values) * q), len(sorted_values) - 1)]


def round_trips(port: int, rate_per_s: int = 1000, samples: int = 2000) -> list[tuple[int, int]]:
    """(start, end) in CLOCK_MONOTONIC ns, in order, of HTTP requests on one keep-alive
    connection at a fixed rate (the clock BPF's ``bpf_ktime_get_ns`` reads, so a trace of
    the kernel's events lines up with them: trace_latency.py)."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    marks = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        interval = 1 / rate_per_s
        next_at = time.perf_counter()
        for _ in range(samples):
            now = time.perf_counter()
            if next_at > now:
                time.sleep(next_at - now)  # pacing the request rate, not synchronising
            next_at += interval
            t0 = time.monotonic_ns()
            s.sendall(request)
            buf = b""
            while b"hello\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("connection closed during latency run")
                buf += chunk
            marks.append((t0, time.monotonic_ns()))
    return marks


def latency(port: int, rate_per_s: int = 1000, samples: int = 2000) -> list[float]:
    """Round trips in microseconds (sorted) of :func:`round_trips`."""
    return sorted((end - start) / 1000 for start, end in round_trips(port, rate_per_s, samples))


def idle_memory(proxy: Proxy) -> dict:
    """RSS growth per idle connection (KiB), with IDLE_CONNECTIONS open through the proxy.

    A proxy that cannot hold them all (e.g. out of fds) is reported with how many it held."""
    pids = proxy.pids()
    before = rss_kib(pids)
    conns = []
    try:
        for i in range(IDLE_CONNECTIONS):
            try:
                s = socket.create_connection(("127.0.0.1", proxy.front["idle"]), timeout=10)
                conns.append(s)
                s.sendall(b"x")  # one round trip: the backend side exists too
                if s.recv(1) != b"x":
                    raise ConnectionError("no echo")
            except OSError as e:
                log(f"{proxy.name}: idle connection {i + 1} failed: {e!r}")
                return {"idle_kib_per_conn": None, "idle_failed_at": i + 1}
        after = rss_kib(proxy.pids())
    finally:
        for s in conns:
            s.close()
    return {"idle_kib_per_conn": (after - before) / IDLE_CONNECTIONS}


def run_workloads(proxy: Proxy) -> tuple[dict, list[float]]:
    """One round's figures, and its latency samples (pooled over rounds for the summary)."""
    r: dict = {}
    fronts = proxy.front
    pids = proxy.pids()

    def measured(fn, *args):
        c0 = cpu_seconds(pids)
        result = fn(*args)
        return result, cpu_seconds(pids) - c0

    (gbps, gb), cpu = measured(iperf, fronts["iperf"], 1)
    r["iperf1_gbps"], r["cpu_per_gb"] = gbps, (cpu / gb if pids else None)
    (gbps8, _), _ = measured(iperf, fronts["iperf"], 8)
    r["iperf8_gbps"] = gbps8
    (rate, total), cpu = measured(wrk, fronts["http"], True)
    r["conn_per_s"], r["cpu_us_per_conn"] = rate, (cpu / total * 1e6 if pids else None)
    (rate, total), cpu = measured(wrk, fronts["http"], False)
    r["keepalive_req_per_s"], r["cpu_us_per_req"] = rate, (cpu / total * 1e6 if pids else None)
    rtts = latency(fronts["http"])
    r["p50_us"], r["p99_us"] = percentile(rtts, 0.5), percentile(rtts, 0.99)
    return r, rtts


# -- the namespace and the backends ------------------------------------------------------

def enter_namespace() -> None:
    subprocess.run(["ip", "netns", "delete", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # As the role sets it on the host: a connection queued on a listener that closes (an
    # old worker generation's, in per-port mode) moves to another listener of its
    # SO_REUSEPORT group instead of being reset. This namespace's own setting.
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1")


def start_backends() -> list[subprocess.Popen]:
    cfg = WORK / "nginx-backend.conf"
    cfg.write_text(f"""worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {WORK}/nginx-backend.pid;
error_log {WORK}/nginx-backend-error.log;
events {{ worker_connections 12000; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    server {{ listen 127.0.0.1:{BACKEND['http']} backlog=4096;
             location / {{ return 200 "hello\\n"; }} }}
}}
""")
    procs = [spawn(["nginx", "-c", str(cfg)], "nginx-backend"),
             spawn(["iperf3", "-s", "-p", str(BACKEND["iperf"])], "iperf3-server"),
             spawn([PYTHON, "-m", "appliance", "--log-level", "warning", "echo", "--listen",
                    f"127.0.0.1:{BACKEND['idle']}"], "echo-backend", cwd=REPO)]
    for port in BACKEND.values():
        wait_port(port)
    return procs


def tear_down(backends: list[subprocess.Popen]) -> None:
    """Stop the backends and delete the run's network namespace."""
    for p in backends:
        p.terminate()
    for p in backends:
        p.wait(10)
    subprocess.run(["ip", "netns", "delete", NS], capture_output=True)
    shutil.rmtree(Path("/etc/netns") / NS, ignore_errors=True)


# -- host-name targets -----------------------------------------------------------------------

BENCH_NAME = "web.bench.test"


def start_dns() -> subprocess.Popen:
    """dnsmasq on 127.0.0.1:53 in the bench's namespace, answering BENCH_NAME (TTL 300 s)
    and nothing else; commands run with `ip netns exec` find it in their resolv.conf."""
    etc = Path("/etc/netns") / NS
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    proc = spawn(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                  "--listen-address=127.0.0.1", "--bind-interfaces", "--port=53",
                  "--local-ttl=300", f"--address=/{BENCH_NAME}/127.0.0.1",
                  f"--pid-file={WORK}/dnsmasq.pid", "--user=root"], "dnsmasq")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(int(line.split()[1].rsplit(":", 1)[1], 16) == 53 for line in
               Path("/proc/net/udp").read_text().splitlines()[1:]):
            return proc
        time.sleep(0.05)  # polling a port another process opens, bounded
    raise RuntimeError(f"dnsmasq did not start; logs in {WORK}")


def host_names(repeats: int = 5) -> dict:
    """New conn/s through flyproxy with its target given as an IP literal and as a host
    name (answered by dnsmasq), alternating ``repeats`` times, medians. Both proxies run
    the same way (`ip netns exec`, one worker)."""
    dns = start_dns()
    literal = FlyProxy(29000, netns_exec=True)
    named = FlyProxy(29100, target_host=BENCH_NAME, netns_exec=True)
    runs: dict[str, list] = {}
    try:
        for proxy in (literal, named):
            proxy.start()
            proxy.ready()
        for _ in range(repeats):
            for label, proxy in (("ip", literal), ("names", named)):
                rate, _ = wrk(proxy.front["http"], True)
                runs.setdefault(f"conn_per_s_{label}", []).append(rate)
    finally:
        for proxy in (literal, named):
            proxy.stop()
        dns.terminate()
        dns.wait(10)
    return {key: median(values) for key, values in runs.items()}


# -- the access log's cost ---------------------------------------------------------------

# label -> serve options: as shipped (--conn-log-level info: a line per connection), sampled,
# off. Every one with its log at info (the unit's level), written as stderr to a file.
ACCESS_LOG = {"on": (), "sampled": ("--conn-log-sample", "10"),
              "off": ("--conn-log-level", "off")}
ACCESS_LOG_REPEATS = int(os.environ.get("BENCH_ACCESS_LOG_REPEATS", "5"))


def access_log(repeats: int = ACCESS_LOG_REPEATS) -> dict:
    """New conn/s and CPU per connection through flyproxy (one worker, per-port) with the
    access log on, sampled and off: three proxies started side by side, measured one after
    another ``repeats`` times (each time starting one later in the list), medians; and the
    access log lines each wrote per connection (counted in its log)."""
    proxies = {label: FlyProxy(29200 + 100 * i, log_level="info", options=options)
               for i, (label, options) in enumerate(ACCESS_LOG.items())}
    for label, proxy in proxies.items():
        proxy.name = f"flyproxy access-log-{label}"  # (its own log file)
    runs: dict[str, list] = {}
    served = dict.fromkeys(proxies, 0)
    try:
        for proxy in proxies.values():
            proxy.start()
            proxy.ready()
        order = list(proxies.items())
        for n in range(repeats):  # each repeat starting one later: none always goes first
            for label, proxy in order[n % len(order):] + order[:n % len(order)]:
                pids = proxy.pids()
                c0 = cpu_seconds(pids)
                rate, total = wrk(proxy.front["http"], True)
                runs.setdefault(f"conn_per_s_{label}", []).append(rate)
                runs.setdefault(f"cpu_us_per_conn_{label}", []).append(
                    (cpu_seconds(pids) - c0) / total * 1e6)
                served[label] += total
                log(f"access log {label}: {rate:,.0f} conn/s, "
                    f"{runs[f'cpu_us_per_conn_{label}'][-1]:.0f} us CPU per connection")
    finally:
        for proxy in proxies.values():
            proxy.stop()
    figures = {key: median(values) for key, values in runs.items()}
    figures["repeats"] = repeats
    figures["load"] = os.getloadavg()[0]  # (other work on the machine moves the rates)
    for label, proxy in proxies.items():
        text = (WORK / f"{proxy.name.replace(' ', '-')}.log").read_text(errors="replace")
        figures[f"lines_per_conn_{label}"] = text.count(" conn=closed ") / max(1, served[label])
    return figures


def access_log_report(figures: dict, run: dict | None = None) -> list[str]:
    """The access log phase's table, ratios to the log off; ``run``: when it ran on its
    own (BENCH_ONLY=access-log)."""
    if not figures.get("conn_per_s_off"):
        return []
    off_rate, off_cpu = figures["conn_per_s_off"], figures["cpu_us_per_conn_off"]
    repeats = figures.get("repeats", ACCESS_LOG_REPEATS)
    lines = ["", f"Access log (flyproxy, one worker, per-port; {repeats} runs "
             "of each, alternating, each time starting one later, medians; ratios to the "
             "access log off). Its log at info, "
             "the unit's level, written as stderr to a file (the rounds above log warnings "
             "only: no access log line)."
             + (f" Load average {figures['load']:.1f} on {os.cpu_count()} CPUs as it ended: "
                "where other work shares the machine the rates swing from run to run, the "
                "CPU per connection much less." if figures.get("load") else "")
             + (f" (This phase ran on its own on {run['date']}, kernel {run['kernel']}, "
                f"in {run['duration_s']} s.)" if run else ""), "",
             "| access log | new connections/s | CPU us per connection | lines per connection |",
             "|---|---|---|---|"]
    for label, text in (("on", "on (the default: a line per connection)"),
                        ("sampled", "sampled (--conn-log-sample 10)"),
                        ("off", "off (--conn-log-level off)")):
        rate, cpu = figures[f"conn_per_s_{label}"], figures[f"cpu_us_per_conn_{label}"]
        lines.append(f"| {text} | {rate:,.0f} ({rate / off_rate:.2f}x) | {cpu:.0f} "
                     f"({cpu / off_cpu:.2f}x) | {figures[f'lines_per_conn_{label}']:.2f} |")
    return lines


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> int:
    if os.geteuid() != 0:
        print("make bench needs root (network namespace, BPF)", file=sys.stderr)
        return 1
    if ONLY and ONLY not in PHASES:
        print(f"make bench: BENCH_ONLY={ONLY}: expected one of {', '.join(PHASES)}",
              file=sys.stderr)
        return 2
    tools = {"scale": ("haproxy",), "access-log": ("nginx", "iperf3", "wrk"),
             "flood": ("haproxy", "nginx", "wrk")}.get(ONLY, (
        "haproxy", "nginx", "iperf3", "wrk", "dnsmasq", "systemd-socket-activate", PROXYD))
    for tool in tools:
        if not shutil.which(tool) and not Path(tool).exists():
            print(f"make bench: {tool} is missing", file=sys.stderr)
            return 1
    if ONLY and not (OUT / "results.json").exists():
        print(f"make bench: BENCH_ONLY={ONLY} adds to {OUT / 'results.json'}, which is "
              "missing: run the whole bench first", file=sys.stderr)
        return 1
    global WORK
    WORK = Path(tempfile.mkdtemp(prefix="flyproxy-bench-"))
    # SIGTERM (a timeout, Ctrl-C's cousin) unwinds like an exception: the finally blocks
    # stop the proxies and backends and delete the namespace
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # As the unit does (LimitNOFILE=1048576), where root may (CAP_SYS_RESOURCE; the scale
    # phase spreads its connections over more processes where it may not).
    limit = min(1 << 20, int(Path("/proc/sys/fs/nr_open").read_text()))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    enter_namespace()
    bpffs = WORK / "bpffs"
    bpffs.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(bpffs)], check=True)
    backends = [] if SCALE_ONLY else start_backends()
    # One thread/worker each, as the issue compares them; then the shipped default (one
    # worker per CPU) beside HAProxy with one thread per CPU.
    proxies = [NoProxy(), HAProxy(21000), NginxStream(22000), SocketProxyd(23000),
               FlyProxy(24000), FlyProxyBPF(25000, bpffs), FlyProxy(26000, workers="auto"),
               HAProxy(28000, threads=os.cpu_count())]
    if os.environ.get("BENCH_UVLOOP", "0") == "1":
        proxies.append(FlyProxy(27000, loop="uvloop"))
    rounds: dict[str, list[dict]] = {p.name: [] for p in proxies}
    rtts: dict[str, list[float]] = {p.name: [] for p in proxies}  # every round's, pooled
    extra: dict[str, dict] = {p.name: {} for p in proxies}
    failed: list[str] = []  # "<proxy>, round N: why", for the report
    started = time.monotonic()
    try:
        for n in range(0 if ONLY else ROUNDS):
            first = n % len(proxies)  # rotate: no proxy always runs right after the same one
            for proxy in proxies[first:] + proxies[:first]:
                log(f"round {n + 1}/{ROUNDS}: {proxy.name}")
                proxy.start()
                try:
                    proxy.ready()
                    figures, samples = run_workloads(proxy)
                    figures["round"] = n + 1
                    rounds[proxy.name].append(figures)
                    rtts[proxy.name] += samples
                    if n == 0 and not isinstance(proxy, NoProxy):
                        extra[proxy.name].update(idle_memory(proxy))
                    if n == 0 and isinstance(proxy, FlyProxy) and proxy.workers == "1" \
                            and proxy.loop == "auto":
                        extra[proxy.name].update(scale(proxy))
                        if not isinstance(proxy, FlyProxyBPF):
                            extra[proxy.name].update(host_names())
                except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                    # One proxy failing one round (it crashed, a load could not run) must not
                    # lose the whole run: that round is missing for it, and the report says so.
                    failed.append(f"{proxy.name}, round {n + 1}: {e}")
                    log(f"{proxy.name}: round {n + 1} failed ({e}); logs in {WORK}")
                finally:
                    proxy.stop()
        logged = {}
        if ONLY in ("", "access-log"):
            log("access log phase: on, sampled, off")
            try:
                logged = access_log()
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                failed.append(f"flyproxy, access log phase: {e}")
                log(f"access log phase failed ({e}); logs in {WORK}")
        scaled = scale_phase(bpffs, failed) if HOLD and ONLY in ("", "scale") else {}
        flooding = flood.run(sys.modules[__name__], bpffs, failed) if ONLY in ("", "flood") \
            else {}
    finally:
        subprocess.run(["umount", str(bpffs)], capture_output=True)
        tear_down(backends)
    if failed:
        log(f"logs of the failed rounds are in {WORK}")
    else:  # nothing to look into: leave no work directory behind
        shutil.rmtree(WORK, ignore_errors=True)
    if ONLY:
        figures = {"scale": scaled, "access-log": logged, "flood": flooding}[ONLY]
        print(merge_phase(ONLY, figures, failed, round(time.monotonic() - started)))
        return 0
    summary = {name: {**{k: median([r[k] for r in runs]) for k in (runs[0] if runs else {})
                         if k != "round"},
                      **extra[name]}
               for name, runs in rounds.items()}
    # A tail percentile of 2,000 samples is the 20th slowest: too few to take a median of.
    # Over every round's samples pooled, p99 rests on a hundred.
    for name, samples in rtts.items():
        if samples:
            samples.sort()
            summary[name]["p50_us"] = percentile(samples, 0.5)
            summary[name]["p99_us"] = percentile(samples, 0.99)
            summary[name]["latency_samples"] = len(samples)
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "seconds": SECONDS, "rounds": ROUNDS,
            "idle_connections": IDLE_CONNECTIONS, "kernel": os.uname().release,
            "cpus": os.cpu_count(), "duration_s": round(time.monotonic() - started),
            "failed": failed}
    (OUT / "results.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                  "rounds": rounds, "scale": scaled,
                                                  "access_log": logged, "flood": flooding},
                                                 indent=1))
    (OUT / "results.md").write_text(report(summary, meta, rounds, scaled, logged, flooding))
    chart(summary)
    print((OUT / "results.md").read_text())
    return 0


def merge_scale(scaled: dict, failed: list[str], duration_s: int) -> str:
    return merge_phase("scale", scaled, failed, duration_s)


def merge_phase(only: str, figures: dict, failed: list[str], duration_s: int) -> str:
    """BENCH_ONLY=``only``: that phase's figures (and failures) replace those in the
    results in OUT; the rounds' and the other phase's stay. Returns the new report."""
    key, words = PHASES[only]
    path = OUT / "results.json"
    results = json.loads(path.read_text())
    meta = results["meta"]
    meta["failed"] = [f for f in meta.get("failed", []) if f", {words}: " not in f] + failed
    meta[f"{key}_run"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "duration_s": duration_s,
                          "kernel": os.uname().release}
    results[key] = figures
    path.write_text(json.dumps(results, indent=1))
    text = report(results["summary"], meta, results["rounds"], results.get("scale"),
                  results.get("access_log"), results.get("flood"))
    (OUT / "results.md").write_text(text)
    return text


def scale_phase(bpffs: Path, failed: list[str]) -> dict:
    """HOLD connections through each of hold_proxies(), one after another: name -> figures."""
    echo = hold.EchoBackend(hold.backends(), hold.processes_for(HOLD))
    scaled = {}
    try:
        for proxy in hold_proxies(bpffs):
            log(f"scale phase: {HOLD:,} connections through {proxy.name}")
            proxy.start()
            try:
                proxy.ready()
                scaled[proxy.name] = hold_phase(proxy)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
                failed.append(f"{proxy.name}, scale phase: {e}")
                log(f"{proxy.name}: scale phase failed ({e}); logs in {WORK}")
            finally:
                proxy.stop()
    finally:
        echo.stop()
    return scaled


def bpf_prog_stats(proxy: Proxy) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of the steering program (kernel.bpf_stats_enabled must be 1)."""
    if not isinstance(proxy, FlyProxyBPF):
        return None
    status = json.loads(subprocess.run(
        [PYTHON, "-m", "appliance", "bpf", "status", "--json", "--pin-dir", str(proxy.pin_dir)],
        cwd=REPO, check=True, capture_output=True, text=True).stdout)
    info = json.loads(subprocess.run(["bpftool", "--json", "prog", "show", "id",
                                      str(status["program"]["id"])],
                                     check=True, capture_output=True, text=True).stdout)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


SCALE_REPEATS = 5  # as many as the rounds: with 3, one noisy window could move a median 6 %


def scale(proxy: FlyProxy, repeats: int = SCALE_REPEATS) -> dict:
    """New conn/s (and CPU per connection) with 10 vs 10,000 configured ports, alternating
    ``repeats`` times, medians; the time to reload to 10,000 ports and back; and in BPF mode
    the kernel's own count of the steering program's run time per lookup."""
    runs: dict[str, list] = {}
    pids = proxy.pids()
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1")
    try:
        for _ in range(repeats):
            for label, extra in (("10_ports", 7), ("10000_ports", SCALE_PORTS - 3)):
                proxy.write_config(extra_http_ports=extra)
                runs.setdefault(f"reload_{label}_s", []).append(proxy.reload())
                c0, b0 = cpu_seconds(pids), bpf_prog_stats(proxy)
                rate, total = wrk(proxy.front["http"], True)
                runs.setdefault(f"conn_per_s_{label}", []).append(rate)
                runs.setdefault(f"cpu_us_per_conn_{label}", []).append(
                    (cpu_seconds(pids) - c0) / total * 1e6)
                if b0 is not None:
                    b1 = bpf_prog_stats(proxy)
                    runs.setdefault(f"bpf_ns_per_lookup_{label}", []).append(
                        (b1[0] - b0[0]) / max(1, b1[1] - b0[1]))
    finally:
        Path("/proc/sys/kernel/bpf_stats_enabled").write_text("0")
    proxy.write_config()
    proxy.reload()
    return {key: median(values) for key, values in runs.items()}


# -- the scale phase: HOLD connections at once ---------------------------------------------

def hold_phase(proxy: Proxy, n: int = HOLD) -> dict:
    """Open ``n`` connections through ``proxy`` (each echoing once), then echo once more on
    every one of them (held); the memory and CPU that cost; a reload with all of them open
    (all must still echo); a restart (they are ended: a restart stops the process) and all
    ``n`` opened again through the new one; an upgrade with those open (all must still
    echo), then they are closed and the old processes must go."""
    clients = hold.Clients(("127.0.0.1", proxy.front["idle"]), hold.processes_for(n))
    try:
        pids = proxy.pids()
        rss0, kernel0, cpu0 = rss_kib(pids), hold.kernel_socket_kib(), cpu_seconds(pids)
        started = time.monotonic()
        opened = clients.call("open", n)
        open_s = time.monotonic() - started
        cpu_s = cpu_seconds(pids) - cpu0
        held = clients.call("echo")["echoed"]
        rss1, kernel1 = rss_kib(proxy.pids()), hold.kernel_socket_kib()
        log(f"{proxy.name}: {held:,} of {n:,} held ({opened['errors'] or 'no errors'})")
        reload_s = proxy.reload()
        after_reload = clients.call("echo")
        prober = hold.Prober(("127.0.0.1", proxy.front["idle"]))  # new clients meanwhile
        try:
            stop_s, start_s = proxy.restart()
        finally:
            during = prober.stop()
        outlived = clients.call("echo")["echoed"]
        clients.call("close")
        started = time.monotonic()
        reopened = clients.call("open", n)
        reopen_s = time.monotonic() - started
        upgraded = upgrade_with_all_open(proxy, clients, reopened["opened"])
    finally:
        clients.stop()
    return {
        "connections": n, "opened": opened["opened"], "open_errors": opened["errors"],
        "held": held, "open_per_s": opened["opened"] / open_s,
        "cpu_us_per_conn": cpu_s / max(1, opened["opened"]) * 1e6,
        "rss_kib_per_conn": (rss1 - rss0) / max(1, held),
        "kernel_kib_per_conn": (kernel1 - kernel0) / max(1, held),
        "reload_s": reload_s, "failed_on_reload": held - after_reload["echoed"],
        "stop_s": stop_s, "start_s": start_s, "outlived_restart": outlived,
        "during_restart": during,
        "reopened": reopened["opened"], "reopen_errors": reopened["errors"],
        "reopen_per_s": reopened["opened"] / reopen_s, **upgraded}


def upgrade_with_all_open(proxy: Proxy, clients: hold.Clients, held: int) -> dict:
    """An upgrade with ``held`` connections open, a prober opening new ones meanwhile (until
    every held one has been checked: the old processes stop accepting at the end of the
    upgrade); then the held ones are closed and the old processes must be gone (bounded)."""
    prober = hold.Prober(("127.0.0.1", proxy.front["idle"]))
    try:
        upgrade_s = proxy.upgrade()
        outlived = clients.call("echo")["echoed"]
    finally:
        during = prober.stop()
    clients.call("close")
    started = time.monotonic()
    proxy.drained()
    return {"upgrade_s": upgrade_s, "held_at_upgrade": held, "outlived_upgrade": outlived,
            "during_upgrade": during, "old_gone_s": time.monotonic() - started}


def hold_proxies(bpffs: Path, n: int = HOLD) -> list[Proxy]:
    """The scale phase's proxies: flyproxy as shipped (one worker per CPU), per-port and
    BPF mode, and HAProxy with one thread per CPU; where the fd limit per process is too
    low for 2 fds per connection in that many processes (a container without
    CAP_SYS_RESOURCE), more flyproxy workers and more HAProxy processes share them."""
    targets = [f"{host}:{port}" for host, port in hold.backends()]
    cpus = os.cpu_count() or 1
    processes = max(cpus, hold.processes_for(2 * n))
    workers = "auto" if processes == cpus else str(processes)
    ours = [FlyProxy(30000, workers=workers), FlyProxyBPF(30100, bpffs, workers=workers)]
    for proxy in ours:
        proxy.hold_targets, proxy.grace = targets, HOLD_GRACE_S
        proxy.code_root = WORK / f"code-{proxy.front['http']}"  # upgraded by the bench
    instances = hold.processes_for(2 * n)
    maxconn = min(250_000, (hold.fd_limit() - hold.FD_MARGIN) // 2)  # HAProxy needs 2 fds each
    return [*ours, HAProxyHold(30200, threads=cpus, instances=instances, maxconn=maxconn)]


def hold_report(held: dict, run: dict | None = None) -> list[str]:
    """The scale phase's table; ``run``: when it ran on its own (BENCH_ONLY=scale)."""
    if not held:
        return []
    names = list(held)
    base = next((v for name, v in held.items() if name.startswith("HAProxy")), None)

    def errors(e: dict) -> str:
        return ", ".join(f"{v:,} {k}" for k, v in sorted(e.items())) or "none"

    def upgraded(cell):  # results from before the upgrade rows have none
        return lambda v: cell(v) if "upgrade_s" in v else "-"

    rows = [("held at once (of connections opened)", lambda v: f"{v['held']:,} of {v['connections']:,}"),
            ("connections that failed to open", lambda v: errors(v["open_errors"])),
            ("open rate (connections/s, each with one echo)", lambda v: f"{v['open_per_s']:,.0f}"),
            ("proxy CPU us per connection opened", lambda v: f"{v['cpu_us_per_conn']:.0f}"),
            ("proxy RSS KiB per connection (all processes)", lambda v: f"{v['rss_kib_per_conn']:.2f}"),
            ("kernel KiB per connection (slab + TCP buffers, all 4 sockets)",
             lambda v: f"{v['kernel_kib_per_conn']:.2f}"),
            ("reload with all open (s)", lambda v: f"{v['reload_s']:.2f}"),
            ("held connections lost on reload", lambda v: f"{v['failed_on_reload']:,}"),
            ("restart with all open: stop, start (s)", lambda v: f"{v['stop_s']:.1f}, {v['start_s']:.1f}"),
            ("held connections that outlived the restart", lambda v: f"{v['outlived_restart']:,}"),
            ("new connections during the restart (failed)",
             lambda v: f"{v['during_restart']['tried']:,} ({errors(v['during_restart']['errors'])})"),
            ("all reopened after the restart (failed)",
             lambda v: f"{v['reopened']:,} ({errors(v['reopen_errors'])})"),
            ("upgrade with all open (s)", upgraded(lambda v: f"{v['upgrade_s']:.1f}")),
            ("held connections that outlived the upgrade",
             upgraded(lambda v: f"{v['outlived_upgrade']:,} of {v['held_at_upgrade']:,}")),
            ("new connections during the upgrade (failed)", upgraded(
                lambda v: f"{v['during_upgrade']['tried']:,} ({errors(v['during_upgrade']['errors'])})")),
            ("old processes gone once the held connections closed (s)",
             upgraded(lambda v: f"{v['old_gone_s']:.1f}"))]
    lines = ["", f"Scale phase: {next(iter(held.values()))['connections']:,} concurrent "
             "connections through each proxy (16 client source addresses, 8 backend "
             "addresses, in the bench's namespace); flyproxy as shipped (one worker per "
             f"CPU), drain grace {HOLD_GRACE_S} s; HAProxy master-worker, maxconn raised "
             "(its reload is a new worker beside the old one). A restart stops the process: "
             "held connections end with it, for every proxy; new connections meanwhile (one "
             f"every {hold.PROBE_EVERY_S * 1000:.0f} ms) wait in the listener's backlog where "
             "the listening socket outlives the process (flyproxy BPF: held by the bench, as "
             "systemd's socket unit holds it) and are refused where it does not. An upgrade "
             "(after the restart, all reopened): flyproxy runs from a copy of its package; "
             "the bench bumps the copy's version (new code on disk, as a package upgrade "
             "leaves it) and runs `flyproxy reload`: a new generation of workers on the new "
             "code, the supervisor re-executed in place, the old generation drains "
             "(net.ipv4.tcp_migrate_req=1 in the bench's namespace, as the role sets it: "
             "per-port mode's old listeners hand their queued connections over); HAProxy's "
             "upgrade is its reload (SIGUSR2 to the master: it re-executes the binary, new "
             "workers start, the old ones keep their connections); the prober runs until "
             "every held connection has been checked, and the old processes must be gone "
             "once the held connections are closed."
             + (f" (This phase ran on its own on {run['date']}, kernel {run['kernel']}, "
                f"in {run['duration_s']} s.)" if run else ""), "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(held[name]) for name in names) + " |")
    if base and base["rss_kib_per_conn"] > 0:
        lines += ["", "RSS per connection against HAProxy: " + "; ".join(
            f"{name} {v['rss_kib_per_conn'] / base['rss_kib_per_conn']:.2f}x"
            for name, v in held.items() if v is not base) + "."]
    return lines


# -- output ------------------------------------------------------------------------------

ROWS = [  # key, label, format, higher is better
    ("iperf1_gbps", "throughput, 1 stream (Gbit/s)", "{:.1f}", True),
    ("iperf8_gbps", "throughput, 8 streams (Gbit/s)", "{:.1f}", True),
    ("conn_per_s", "new connections/s (wrk, Connection: close)", "{:,.0f}", True),
    ("keepalive_req_per_s", "keep-alive requests/s (wrk)", "{:,.0f}", True),
    ("p50_us", "latency p50 at 1,000 req/s (us)", "{:.0f}", False),
    ("p99_us", "latency p99 at 1,000 req/s (us)", "{:.0f}", False),
    ("cpu_per_gb", "CPU s per GB moved", "{:.3f}", False),
    ("cpu_us_per_conn", "CPU us per connection", "{:.0f}", False),
    ("cpu_us_per_req", "CPU us per keep-alive request", "{:.1f}", False),
    ("idle_kib_per_conn", "RSS KiB per idle connection", "{:.1f}", False),
]


RIVAL = "systemd-socket-proxyd"  # the issue asks flyproxy to be ahead of it on every row


def rounds_ahead(rounds: dict, name: str, key: str, higher: bool) -> tuple[int, int]:
    """In how many rounds ``name`` did better than the rival on ``key`` (rounds both ran)."""
    rival = {r["round"]: r.get(key) for r in rounds.get(RIVAL, [])}
    ahead = n = 0
    for r in rounds[name]:
        theirs, ours = rival.get(r["round"]), r.get(key)
        if theirs is None or ours is None:
            continue
        n += 1
        ahead += ours > theirs if higher else ours < theirs
    return ahead, n


def report(summary: dict, meta: dict, rounds: dict, scaled: dict | None = None,
           logged: dict | None = None, flooding: dict | None = None) -> str:
    names = list(summary)
    base = summary.get("HAProxy", {})
    lines = [f"# flyproxy benchmark ({meta['date']})", "",
             f"{meta['cpus']} CPUs, kernel {meta['kernel']}, loopback in a private network "
             f"namespace; {meta['rounds']} rounds of {meta['seconds']:g} s loads (every "
             "proxy once per round, each round starting one later in the list), medians "
             "(latency percentiles over every round's samples pooled); "
             f"{meta['idle_connections']:,} idle connections for memory; took "
             f"{meta['duration_s']} s. Every proxy on one thread/worker (flyproxy: one "
             "worker process; flyproxy BPF: the same, on one listener steered by sk_lookup); "
             "then flyproxy as shipped, one worker per CPU "
             f"({meta['cpus']} here), beside HAProxy with one thread per CPU. Ratios are to "
             "HAProxy (one thread) in the same run (for cost rows, lower is better).", "",
             "| metric | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for key, label, fmt, _ in ROWS:
        cells = []
        for name in names:
            v = summary[name].get(key)
            if v is None:
                failed = summary[name].get("idle_failed_at") if key == "idle_kib_per_conn" else None
                cells.append(f"failed at connection {failed:,}" if failed else "-")
                continue
            ratio = f" ({v / base[key]:.2f}x)" if base.get(key) and name != "HAProxy" else ""
            cells.append(fmt.format(v) + ratio)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ours = [n for n in names if n.startswith("flyproxy") and rounds.get(n)]
    if rounds.get(RIVAL) and ours:
        lines += ["", f"Round by round against {RIVAL} (each round runs every proxy once, "
                  "one after another): in how many rounds flyproxy did better.", "",
                  "| metric | " + " | ".join(ours) + " |", "|---|" + "---|" * len(ours)]
        for key, label, _, higher in ROWS:
            counts = [rounds_ahead(rounds, name, key, higher) for name in ours]
            if any(n for _, n in counts):
                lines.append(f"| {label} | " + " | ".join(
                    f"{ahead} of {n}" if n else "-" for ahead, n in counts) + " |")
    for name, v in summary.items():
        if "reload_10000_ports_s" in v:
            lines += ["", f"**{name}**, 10 vs 10,000 configured ports ({SCALE_REPEATS} "
                      f"alternating runs, medians): new conn/s {v['conn_per_s_10_ports']:,.0f} vs "
                      f"{v['conn_per_s_10000_ports']:,.0f} "
                      f"({v['conn_per_s_10000_ports'] / v['conn_per_s_10_ports']:.2f}x); CPU us per "
                      f"connection {v['cpu_us_per_conn_10_ports']:.0f} vs "
                      f"{v['cpu_us_per_conn_10000_ports']:.0f} "
                      f"({v['cpu_us_per_conn_10000_ports'] / v['cpu_us_per_conn_10_ports']:.2f}x); "
                      f"reload to 10,000 ports {v['reload_10000_ports_s']:.2f} s "
                      f"(to 10 ports {v['reload_10_ports_s']:.2f} s)."]
            if "bpf_ns_per_lookup_10_ports" in v:
                lines[-1] += (f" The sk_lookup program itself (kernel.bpf_stats_enabled): "
                              f"{v['bpf_ns_per_lookup_10_ports']:.0f} ns per run with 10 ports, "
                              f"{v['bpf_ns_per_lookup_10000_ports']:.0f} ns with 10,000.")
    for name, v in summary.items():
        if "conn_per_s_names" in v:
            lines += ["", f"**{name}**, host-name targets ({SCALE_REPEATS} alternating runs, "
                      "medians; the name answered by dnsmasq in the namespace, TTL 300 s): "
                      f"new conn/s {v['conn_per_s_names']:,.0f} with the target as a host name "
                      f"vs {v['conn_per_s_ip']:,.0f} as an IP literal "
                      f"({v['conn_per_s_names'] / v['conn_per_s_ip']:.2f}x)."]
    lines += access_log_report(logged or {}, meta.get("access_log_run"))
    lines += hold_report(scaled or {}, meta.get("scale_run"))
    lines += flood.report(flooding or {}, meta.get("flood_run"))
    if meta.get("failed"):
        lines += ["", "Rounds that failed (that proxy's medians are over its other rounds): "
                  + "; ".join(meta["failed"]) + "."]
    return "\n".join(lines) + "\n"


def chart(summary: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no chart")
        return
    base = summary["HAProxy"]
    names = [n for n in summary if n not in ("HAProxy", "no proxy")]
    keys = [(k, label) for k, label, _, _ in ROWS if base.get(k)]
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ratios = [(summary[name].get(k) or 0) / base[k] for k, _ in keys]
        ax.bar([x + i * width for x in range(len(keys))], ratios, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels([label.split(" (")[0] for _, label in keys], rotation=30, ha="right",
                       fontsize=8)
    ax.set_ylabel("ratio to HAProxy (rates: higher is better; costs: lower is better)")
    ax.set_title("flyproxy vs HAProxy, nginx stream, systemd-socket-proxyd")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "chart.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
