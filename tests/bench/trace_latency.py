#!/usr/bin/env python3
"""Where a proxy's latency tail comes from: the benchmark's latency load (one keep-alive
connection, 1,000 requests/s) through one proxy, with the kernel's scheduler events and
system calls of the client (this process), the proxy and the nginx backend traced by bcc
and lined up with each round trip.

    .venv/bin/python tests/bench/trace_latency.py flyproxy|socket-proxyd [--samples N] [--show K]

(as root; bcc comes from Debian's python3-bpfcc, so /usr/bin/python3 or the venv made from
it). Prints the round trips in two kinds, those whose events all ran on one CPU and those
where the scheduler put one of the three processes on another, with percentiles of each
and how many of the slow ones (over --slow us) crossed CPUs; --show K prints the events of
the K-th slowest round trip. The trace costs about a microsecond an event, so absolute
figures are a little higher than `make bench`'s. Loopback only, in the benchmark's own
network namespace; bounded by --samples.
"""

from __future__ import annotations

import argparse
import bisect
import ctypes
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402

WHO = ("client", "proxy", "backend")
KINDS = {-1: "woken", -2: "switched in", -3: "switched out"}
SYSCALL_ENTER, SYSCALL_EXIT = 1000, 2000  # as in trace_latency.bpf.c
SYSCALLS = {0: "read", 1: "write", 7: "poll", 20: "writev", 44: "sendto", 45: "recvfrom",
            230: "clock_nanosleep", 232: "epoll_wait", 275: "splice", 281: "epoll_pwait"}


class Event(NamedTuple):
    ts: int  # CLOCK_MONOTONIC ns
    cpu: int
    who: int  # index into WHO
    tid: int
    kind: int
    arg: int

    def describe(self) -> str:
        if self.kind in KINDS:
            extra = {-1: f" (to CPU {self.arg})", -3: f" (state {self.arg})"}.get(self.kind, "")
            return KINDS[self.kind] + extra
        if self.kind >= SYSCALL_EXIT:
            nr = self.kind - SYSCALL_EXIT
            return f"  <- {SYSCALLS.get(nr, nr)} = {self.arg}"
        nr = self.kind - SYSCALL_ENTER
        return f"  -> {SYSCALLS.get(nr, nr)}"


def split_by_cpu(marks: list[tuple[int, int]], events: list[Event]) -> dict[str, list[float]]:
    """Round trips (us) whose traced events all ran on one CPU, and those that crossed.

    ``events`` sorted by time; a round trip owns the events between its start and end."""
    times = [e.ts for e in events]
    kinds: dict[str, list[float]] = {"one CPU": [], "crossed CPUs": []}
    for start, end in marks:
        cpus = {e.cpu for e in events[bisect.bisect_left(times, start):
                                       bisect.bisect_right(times, end)]}
        kinds["one CPU" if len(cpus) <= 1 else "crossed CPUs"].append((end - start) / 1000)
    return kinds


def summary(marks: list[tuple[int, int]], events: list[Event], slow_us: float) -> str:
    rtts = sorted((end - start) / 1000 for start, end in marks)
    lines = [f"{len(rtts)} round trips: p50 {bench.percentile(rtts, 0.5):.0f} us, "
             f"p99 {bench.percentile(rtts, 0.99):.0f} us"]
    for kind, values in split_by_cpu(marks, events).items():
        values.sort()
        if not values:
            lines.append(f"  {kind}: none")
            continue
        lines.append(f"  {kind}: {len(values)} ({100 * len(values) / len(rtts):.0f} %), "
                     f"p50 {bench.percentile(values, 0.5):.0f}, "
                     f"p90 {bench.percentile(values, 0.9):.0f}, "
                     f"p99 {bench.percentile(values, 0.99):.0f} us; "
                     f"over {slow_us:g} us: {sum(v > slow_us for v in values)}")
    return "\n".join(lines)


def timeline(mark: tuple[int, int], events: list[Event], before_us: float = 20) -> str:
    start, end = mark
    times = [e.ts for e in events]
    lines = [f"round trip of {(end - start) / 1000:.0f} us (times in us from the client's send):"]
    for e in events[bisect.bisect_left(times, start - before_us * 1000):
                    bisect.bisect_right(times, end)]:
        lines.append(f"  {(e.ts - start) / 1000:8.1f}  CPU {e.cpu}  {WHO[e.who]:7} "
                     f"{e.tid:>7}  {e.describe()}")
    return "\n".join(lines)


def trace(proxy: bench.Proxy, samples: int) -> tuple[list[tuple[int, int]], list[Event], int]:
    from bcc import BPF  # Debian's python3-bpfcc; only this tool needs it

    b = BPF(src_file=str(Path(__file__).with_suffix(".bpf.c")))
    tags = b["tags"]

    def tag(pid: int, who: str) -> None:
        tags[ctypes.c_uint32(pid)] = ctypes.c_uint32(WHO.index(who))

    tag(os.getpid(), "client")
    for pid in proxy.pids():
        tag(pid, "proxy")
    master = (bench.WORK / "nginx-backend.pid").read_text().strip()
    for pid in subprocess.run(["pgrep", "-P", master], capture_output=True,
                              text=True).stdout.split():
        tag(int(pid), "backend")
    marks = bench.round_trips(proxy.front["http"], samples=samples)
    events: list[Event] = []
    ring = b["events"]

    def take(ctx, data, size):
        e = ring.event(data)
        events.append(Event(e.ts, e.cpu, e.who, e.tid, e.kind, e.arg))

    ring.open_ring_buffer(take)
    b.ring_buffer_consume()
    dropped = b["dropped"][ctypes.c_int(0)].value
    b.cleanup()
    events.sort()
    return marks, events, dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("proxy", choices=["flyproxy", "socket-proxyd"])
    parser.add_argument("--samples", type=int, default=5000, help="round trips (default 5000)")
    parser.add_argument("--slow", type=float, default=180, help="slow above this many us")
    parser.add_argument("--show", type=int, metavar="K", action="append", default=[],
                        help="print the events of the K-th slowest round trip (1 = slowest)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("trace_latency.py needs root (network namespace, BPF)", file=sys.stderr)
        return 1
    bench.WORK = Path(tempfile.mkdtemp(prefix="flyproxy-trace-"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bench.enter_namespace()
    backends = bench.start_backends()
    proxy = bench.SocketProxyd(23000) if args.proxy == "socket-proxyd" else bench.FlyProxy(24000)
    try:
        proxy.start()
        try:
            proxy.ready()
            bench.latency(proxy.front["http"], samples=200)  # warm up, as the benchmark does
            marks, events, dropped = trace(proxy, args.samples)
        finally:
            proxy.stop()
    finally:
        bench.tear_down(backends)
        shutil.rmtree(bench.WORK, ignore_errors=True)
    print(f"{args.proxy}: {len(events):,} events traced"
          + (f", {dropped:,} DROPPED (ring buffer full)" if dropped else ""))
    print(summary(marks, events, args.slow))
    by_time = sorted(marks, key=lambda m: m[0] - m[1])  # slowest first
    for k in args.show:
        print(timeline(by_time[k - 1], events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
