#!/usr/bin/env python3
"""Two trees' flyproxy side by side, in one run: a change to the hot path, before and after.

    sudo python3 tests/bench/compare.py BASELINE_DIR

BASELINE_DIR is another checkout of the project (a worktree of main, say, or a
``git archive`` of a commit). flyproxy runs as `make bench`'s "flyproxy" column (per-port,
one worker, metrics on) from this tree and from BASELINE_DIR, alternating within each of
BENCH_ROUNDS rounds (default 8; the first tree alternates too, so neither always runs
right after the other), against the bench's backends in its network namespace. Each round
measures throughput through one and eight iperf3 streams with the proxy's CPU per GB, and
new connections per second (wrk, ``Connection: close``) with its CPU per connection.
Prints every round (to see the machine's noise) and the medians; writes nothing.

Mind the harness's own bias: identical code in the checkout and in a copy under /tmp
differed by about 4 % in CPU per connection over 10 rounds (docs/performance.md, step 23);
put both trees in the same place, or run twice with the places swapped.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import bench

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "8"))
ROWS = (("iperf1_gbps", "throughput, 1 stream (Gbit/s)", "{:.1f}"),
        ("iperf8_gbps", "throughput, 8 streams (Gbit/s)", "{:.1f}"),
        ("cpu_per_gb", "CPU s per GB moved (1 stream)", "{:.3f}"),
        ("conn_per_s", "new connections/s (wrk, Connection: close)", "{:,.0f}"),
        ("cpu_us_per_conn", "CPU us per connection", "{:.0f}"))


class Tree(bench.FlyProxy):
    """flyproxy run from ``root`` (``python3 -m appliance`` in that directory)."""

    def __init__(self, base: int, root: Path, name: str) -> None:
        super().__init__(base)
        self.name = name
        self.code_root = root  # serve() runs in it, so `-m appliance` is that tree's

    def copy_code(self) -> None:
        pass  # (run from the tree itself, not a copy)


def measure(proxy: Tree) -> dict:
    pids = proxy.pids()

    def measured(fn, *args):
        c0 = bench.cpu_seconds(pids)
        result = fn(*args)
        return result, bench.cpu_seconds(pids) - c0

    r = {}
    (gbps, gb), cpu = measured(bench.iperf, proxy.front["iperf"], 1)
    r["iperf1_gbps"], r["cpu_per_gb"] = gbps, cpu / gb
    (r["iperf8_gbps"], _), _ = measured(bench.iperf, proxy.front["iperf"], 8)
    (rate, total), cpu = measured(bench.wrk, proxy.front["http"], True)
    r["conn_per_s"], r["cpu_us_per_conn"] = rate, cpu / total * 1e6
    return r


def main() -> int:
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "appliance").is_dir():
        print("usage: compare.py BASELINE_DIR (a checkout with an appliance/ package)",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("compare.py needs root (network namespace)", file=sys.stderr)
        return 1
    for tool in ("nginx", "iperf3", "wrk"):
        if not shutil.which(tool):
            print(f"compare.py: {tool} is missing (make bench installs it)", file=sys.stderr)
            return 1
    baseline = Path(sys.argv[1]).resolve()
    bench.WORK = Path(tempfile.mkdtemp(prefix="flyproxy-compare-"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench.NS = "flyproxy-compare"  # its own namespace: a `make bench` may be running
    bench.enter_namespace()
    backends = bench.start_backends()
    trees = [Tree(24000, bench.REPO, "this tree"), Tree(25000, baseline, "baseline")]
    bench.log(f"this tree: {bench.REPO}; baseline: {baseline}")
    rounds: dict[str, list[dict]] = {t.name: [] for t in trees}
    try:
        for n in range(ROUNDS):
            for tree in (trees if n % 2 == 0 else trees[::-1]):
                bench.log(f"round {n + 1}/{ROUNDS}: {tree.name}")
                tree.start()
                try:
                    tree.ready()
                    rounds[tree.name].append(measure(tree))
                finally:
                    tree.stop()
    finally:
        bench.tear_down(backends)
    shutil.rmtree(bench.WORK, ignore_errors=True)
    a, b = (rounds[t.name] for t in trees)
    print(f"\n{ROUNDS} rounds, {bench.SECONDS:g} s per load; medians (each round's figures after)")
    # Both trees run back to back in a round: a round's ratio compares like machine states.
    print("| metric | this tree | baseline | ratio of medians | median of round ratios "
          "(min-max) |\n|---|---|---|---|---|")
    for key, label, fmt in ROWS:
        ma, mb = (statistics.median(r[key] for r in runs) for runs in (a, b))
        ratios = [x[key] / y[key] for x, y in zip(a, b)]
        print(f"| {label} | {fmt.format(ma)} | {fmt.format(mb)} | {ma / mb:.3f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    for key, label, fmt in ROWS:
        print(f"\n{label}:")
        for name, runs in rounds.items():
            print(f"  {name}: " + ", ".join(fmt.format(r[key]) for r in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
