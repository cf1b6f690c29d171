"""`make bench`'s noisy-neighbour phase: one app flooded, another under a light load.

App A gets a connection flood from many source addresses (FLOOD_PROCESSES generators at nice 19, each
keeping FLOOD_INFLIGHT connects in flight from 4,000 loopback addresses, every connection
reset as soon as it is established), well past what a proxy on this machine accepts. App B
gets a probe: a new connection every 1/PROBE_RATE s, timed from connect() to the first byte
of the backend's answer (so it counts the proxy's accept and its backend connect), with a
bound of PROBE_TIMEOUT_S. Each proxy runs B's probe alone (unloaded), then with the flood:
B's success and p99, A's accepted rate (passed on to A's backend), CPU.

Proxies, each configured for the same protection the way its documentation says:

- flyproxy per-port and BPF, as shipped (a worker per CPU; BPF with its lanes): A has
  ``MaxConnectionRate`` (FLOOD_APP_RATE/s) and ``MaxConnectionsPerClient``;
- HAProxy (a thread per CPU): A's frontend has ``rate-limit sessions`` and a stick table on
  the source address rejecting over ``sc0_conn_rate``/``sc0_conn_cur``
  (the configuration guide's "tcp-request connection" examples).

Then the cost rows: new connections/s through flyproxy (per-port, as shipped) with each
limit on (set high enough never to refuse) against none, alternating, medians.

Run by bench.py (``BENCH_ONLY=flood`` alone); ``python3 flood.py gen PORT SECONDS N`` is
one flood generator.
"""

from __future__ import annotations

import json
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request

FLOOD_PROCESSES = 2
FLOOD_INFLIGHT = 512
FLOOD_APP_RATE = 2000  # A's MaxConnectionRate (flyproxy) and rate-limit sessions (HAProxy)
FLOOD_PER_CLIENT = 20  # A's MaxConnectionsPerClient, and HAProxy's sc0_conn_cur
PROBE_RATE = 200  # B's new connections per second
PROBE_SECONDS = 8
PROBE_TIMEOUT_S = 3.0
COST_REPEATS = 3
LINGER_RESET = struct.pack("ii", 1, 0)
REQUEST = b"GET / HTTP/1.0\r\n\r\n"


# -- the flood generator (a process of its own) -----------------------------------------------

def generate(port: int, seconds: float, index: int) -> dict:
    """Open connections to ``port`` as fast as they complete, from 4,000 source addresses
    (127.<index+10>.x.y), each reset once established; a connect pending for 1 s is given
    up. Returns counts."""
    ep = select.epoll()
    inflight: dict[int, tuple[socket.socket, float]] = {}
    sources = [f"127.{index + 10}.{i >> 8}.{i & 255}" for i in range(1, 4001)]
    attempts = established = failed = 0
    deadline = time.monotonic() + seconds
    while (now := time.monotonic()) < deadline:
        while len(inflight) < FLOOD_INFLIGHT:
            s = socket.socket()
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            try:
                s.bind((sources[attempts % len(sources)], 0))
            except OSError:
                s.close()
                failed += 1
                break
            attempts += 1
            s.connect_ex(("127.0.0.1", port))
            ep.register(s.fileno(), select.EPOLLOUT)
            inflight[s.fileno()] = (s, now)
        for fd, events in ep.poll(0.005):
            s, _ = inflight.pop(fd)
            ep.unregister(fd)
            if events & (select.EPOLLERR | select.EPOLLHUP):
                failed += 1
            else:
                established += 1
            s.close()  # a reset
        if attempts % 64 == 0:  # connects pending for a second (SYN dropped): give up
            for fd, (s, at) in list(inflight.items()):
                if now - at > 1.0:
                    del inflight[fd]
                    ep.unregister(fd)
                    s.close()
                    failed += 1
    for s, _ in inflight.values():
        s.close()
    return {"attempts": attempts, "established": established, "failed": failed}


# -- B's probe ----------------------------------------------------------------------------

def probe(port: int, seconds: float = PROBE_SECONDS) -> dict:
    """A connection every 1/PROBE_RATE s: connect, ask, first byte back. (A slow one delays
    the next: the rate is a ceiling, the count is what was tried.)"""
    times, failures = [], 0
    interval = 1 / PROBE_RATE
    next_at = time.perf_counter()
    deadline = next_at + seconds
    while next_at < deadline:
        now = time.perf_counter()
        if next_at > now:
            time.sleep(next_at - now)  # pacing the probe rate, not synchronising
        next_at += interval
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S) as s:
                s.sendall(REQUEST)
                if not s.recv(1):
                    raise ConnectionError("closed")
            times.append((time.perf_counter() - t0) * 1e6)
        except OSError:
            failures += 1
    times.sort()
    n = len(times) + failures
    return {"tried": n, "success_pct": 100 * len(times) / n if n else None,
            "p50_us": times[len(times) // 2] if times else None,
            "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] if times else None}


def metric(port: int, name: str, **labels) -> float:
    """The sum of ``name``'s samples with ``labels`` on flyproxy's metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{")
               and all(f'{k}="{v}"' in line for k, v in labels.items()))


# -- the proxies, configured for the flood ----------------------------------------------------

def proxies(b, bpffs):
    """(flyproxy per-port, flyproxy BPF, HAProxy), each with app A on front["http"] and B on
    front["b"], both to the bench's nginx backend."""
    backend = f"127.0.0.1:{b.BACKEND['http']}"

    def apps(front) -> list[dict]:
        return [{"Name": "a", "Ports": [front["http"]], "Targets": [backend],
                 "MaxConnectionRate": FLOOD_APP_RATE, "MaxConnectionsPerClient": FLOOD_PER_CLIENT},
                {"Name": "b", "Ports": [front["b"]], "Targets": [backend]}]

    class Fly(b.FlyProxy):
        def __init__(self, base):
            super().__init__(base, workers="auto")
            self.front = {"http": base, "b": base + 1}

        def write_config(self, extra_http_ports: int = 0) -> None:
            self.config.write_text(json.dumps({"Apps": apps(self.front)}))

    class FlyBPF(b.FlyProxyBPF):
        def __init__(self, base):
            super().__init__(base, bpffs, workers="auto")
            self.front = {"http": base, "b": base + 1}

        def write_config(self, extra_http_ports: int = 0) -> None:
            self.config.write_text(json.dumps({"Apps": apps(self.front)}))

    class HAProxy(b.HAProxy):
        def __init__(self, base):
            super().__init__(base, threads=b.os.cpu_count())
            self.front = {"http": base, "b": base + 1}
            self.stats = b.WORK / f"haproxy-{base}.sock"

        def start(self) -> None:
            cfg = b.WORK / f"haproxy-flood-{self.front['http']}.cfg"
            cfg.write_text(f"""global
    nbthread {self.threads}
    maxconn 9000
    stats socket {self.stats}
defaults
    mode tcp
    maxconn 9000
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend a
    bind 127.0.0.1:{self.front['http']}
    rate-limit sessions {FLOOD_APP_RATE}
    stick-table type ip size 1m expire 10s store conn_cur,conn_rate(1s)
    tcp-request connection track-sc0 src
    tcp-request connection reject if {{ sc0_conn_cur gt {FLOOD_PER_CLIENT} }}
    default_backend a
backend a
    server s1 {backend}
frontend b
    bind 127.0.0.1:{self.front['b']}
    default_backend b
backend b
    server s1 {backend}
""")
            self.procs = [b.spawn(["haproxy", "-f", str(cfg)], "haproxy-flood")]

        def accepted_a(self) -> float:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(self.stats))
                s.sendall(b"show stat\n")
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
            rows = [line.split(",") for line in out.decode().splitlines() if line.startswith("a,")]
            return float(next(r[7] for r in rows if r[1] == "BACKEND"))  # stot

    return [Fly(31000), FlyBPF(31100), HAProxy(31200)]


def accepted_a(proxy) -> float:
    """Connections to app A the proxy passed on to A's backend, so far."""
    if hasattr(proxy, "accepted_a"):
        return proxy.accepted_a()
    return metric(proxy.front["http"] + 9, "flyproxy_connections_accepted_total", app="a")


def flooded(b, proxy) -> dict:
    """B's probe alone, then with A flooded: the figures."""
    out = {"unloaded": probe(proxy.front["b"])}
    # The generators run at nice 19: on an edge host a flood's cost of making connections is
    # not the host's; here they would otherwise take the CPU from the proxies under test.
    gens = [subprocess.Popen(["nice", "-n", "19", sys.executable, __file__, "gen",
                              str(proxy.front["http"]),
                              str(PROBE_SECONDS + 2), str(i)], stdout=subprocess.PIPE, text=True)
            for i in range(FLOOD_PROCESSES)]
    time.sleep(1)  # the flood is under way before B's probe starts (a warm-up, not a wait on an event)
    pids = proxy.pids()
    cpu0, a0, t0 = b.cpu_seconds(pids), accepted_a(proxy), time.monotonic()
    out["flooded"] = probe(proxy.front["b"])
    seconds = time.monotonic() - t0
    out["a_accepted_per_s"] = (accepted_a(proxy) - a0) / seconds
    out["cpu_per_s"] = (b.cpu_seconds(pids) - cpu0) / seconds
    counts = [json.loads(g.communicate(timeout=PROBE_SECONDS + 30)[0]) for g in gens]
    flood_s = PROBE_SECONDS + 2
    out["a_attempted_per_s"] = sum(c["attempts"] for c in counts) / flood_s
    out["a_established_per_s"] = sum(c["established"] for c in counts) / flood_s
    return out


def cost_rows(b) -> dict:
    """New conn/s (wrk, Connection: close) through flyproxy per-port as shipped, with each
    limit on (never reached) and none, alternating COST_REPEATS times: medians."""
    variants = {"none": {}, "MaxConnections": {"MaxConnections": 10**9},
                "MaxConnectionsPerClient": {"MaxConnectionsPerClient": 10**9},
                "MaxConnectionRatePerClient": {"MaxConnectionRatePerClient": 1e6},
                "MaxConnectionRate": {"MaxConnectionRate": 1e6},
                "BytesPerSecond": {"BytesPerSecond": 10**9}}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    proxy = b.FlyProxy(31300, workers="auto")
    proxy.start()
    proxy.ready()
    try:
        for _ in range(COST_REPEATS):
            for name, keys in variants.items():
                doc = json.loads(proxy.config.read_text())
                http = next(a for a in doc["Apps"] if a["Name"] == "http")
                for key in variants:
                    http.pop(key, None)
                http.update(keys)
                proxy.config.write_text(json.dumps(doc))
                proxy.reload()
                runs[name].append(b.wrk(proxy.front["http"], True)[0])
    finally:
        proxy.stop()
    return {name: statistics.median(v) for name, v in runs.items()}


def run(b, bpffs, failed: list[str]) -> dict:
    """The phase: name -> figures, and "cost" -> conn/s per limit."""
    results: dict = {}
    for proxy in proxies(b, bpffs):
        b.log(f"flood phase: {proxy.name}")
        proxy.start()
        try:
            proxy.ready()
            results[proxy.name] = flooded(b, proxy)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, StopIteration) as e:
            failed.append(f"{proxy.name}, flood phase: {e}")
            b.log(f"{proxy.name}: flood phase failed ({e})")
        finally:
            proxy.stop()
    b.log("flood phase: cost of each limit")
    try:
        results["cost"] = cost_rows(b)
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
        failed.append(f"flyproxy, flood phase cost rows: {e}")
    return results


def report(results: dict, run: dict | None = None) -> list[str]:
    """The phase's tables; ``run``: when it ran on its own (BENCH_ONLY=flood)."""
    if not results:
        return []
    names = [n for n in results if n != "cost"]
    alone = (f" (run on its own, {run['date']}, kernel {run['kernel']}, took "
             f"{run['duration_s']} s)") if run else ""
    lines = ["", f"## Noisy neighbour: app A flooded, app B under a light load{alone}", "",
             f"A gets {FLOOD_PROCESSES} flood generators at nice 19 ({FLOOD_INFLIGHT} connects in flight "
             "each, from 4,000 source addresses, every connection reset once established); B "
             f"gets a new connection every {1000 / PROBE_RATE:g} ms for {PROBE_SECONDS} s, timed "
             "from connect() to the backend's first byte (bound "
             f"{PROBE_TIMEOUT_S:g} s). A's protection: flyproxy MaxConnectionRate "
             f"{FLOOD_APP_RATE}/s and MaxConnectionsPerClient {FLOOD_PER_CLIENT}; HAProxy "
             f"`rate-limit sessions {FLOOD_APP_RATE}` and a stick table rejecting a source over "
             f"{FLOOD_PER_CLIENT} connections. Both proxies with a worker/thread per CPU.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def cell(name, f):
        try:
            return f(results[name])
        except (KeyError, TypeError):
            return "-"

    rows = [("B success, unloaded", lambda r: f"{r['unloaded']['success_pct']:.2f} %"),
            ("B success, A flooded", lambda r: f"{r['flooded']['success_pct']:.2f} %"),
            ("B p50, unloaded (us)", lambda r: f"{r['unloaded']['p50_us']:,.0f}"),
            ("B p50, A flooded (us)", lambda r: f"{r['flooded']['p50_us']:,.0f}"),
            ("B p99, unloaded (us)", lambda r: f"{r['unloaded']['p99_us']:,.0f}"),
            ("B p99, A flooded (us)", lambda r: f"{r['flooded']['p99_us']:,.0f} "
             f"({r['flooded']['p99_us'] / r['unloaded']['p99_us']:.1f}x)"),
            ("A connects tried/s", lambda r: f"{r['a_attempted_per_s']:,.0f}"),
            ("A established/s (kernel handshakes)", lambda r: f"{r['a_established_per_s']:,.0f}"),
            ("A passed to its backend/s", lambda r: f"{r['a_accepted_per_s']:,.0f}"),
            ("proxy CPU during the flood (cores)", lambda r: f"{r['cpu_per_s']:.2f}")]
    for label, f in rows:
        lines.append(f"| {label} | " + " | ".join(cell(n, f) for n in names) + " |")
    cost = results.get("cost")
    if cost:
        none = cost["none"]
        lines += ["", "Cost of each limit: new connections/s through flyproxy per-port as "
                  f"shipped (wrk, Connection: close), {COST_REPEATS} alternating runs, medians; "
                  "each limit set high enough never to refuse.", "",
                  "| limit | new conn/s | vs none |", "|---|---|---|"]
        for name, rate in cost.items():
            lines.append(f"| {name} | {rate:,.0f} | {rate / none:.2f}x |")
    return lines


if __name__ == "__main__" and sys.argv[1:2] == ["gen"]:
    print(json.dumps(generate(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))))
