"""The standard ``process_*`` metrics, for the whole service, and per worker.

prometheus_client's own ProcessCollector describes one process and lists its fds on every
scrape. Ours describes the service as ``systemctl status`` sees it: a single process, or a
supervisor and its workers together:

- ``process_cpu_seconds_total``: the supervisor's own CPU, plus its children that exited
  (getrusage(RUSAGE_CHILDREN): a worker that exits or is replaced keeps its share, so the
  counter never goes back), plus the live workers' (``/proc/PID/stat``);
- ``process_resident_memory_bytes``, ``process_virtual_memory_bytes``: summed over the
  supervisor and the live workers;
- ``process_open_fds``: summed likewise (the workers' counted by themselves, at most a
  second old); ``process_max_fds``: the limit of one process (each has its own);
- ``process_start_time_seconds``: when the service (the supervisor) started.

Each live worker also has ``flyproxy_worker_cpu_seconds_total`` and
``flyproxy_worker_resident_memory_bytes``, labelled with its index and its generation (the
code it runs: after an upgrade, the draining generation's workers show apart).
"""

from __future__ import annotations

import os
import resource
import time

_TICK_S = 1 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_boot_time: float | None = None


def boot_time() -> float:
    """The Unix time the host booted: now less CLOCK_BOOTTIME (the unit's ProcSubset=pid
    hides /proc/stat and its btime)."""
    global _boot_time
    if _boot_time is None:
        _boot_time = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return _boot_time


def stat(pid: int | str = "self") -> tuple[float, int, int, float] | None:
    """(CPU seconds, resident bytes, virtual bytes, start as Unix time) of a process, from
    /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is field 3 of proc(5): utime is 14, stime 15, starttime 22, vsize 23, rss 24
    return ((int(fields[11]) + int(fields[12])) * _TICK_S, int(fields[21]) * _PAGE,
            int(fields[20]), int(fields[19]) * _TICK_S + boot_time())


def families(fds: tuple[int, int], workers: list[tuple[int, int, int]] | None = None):
    """The process families: this process's, plus ``workers`` (index, generation, pid)
    when it is a supervisor; ``fds`` is (open, per-process limit), the workers' included."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    own = stat() or (0.0, 0, 0, 0.0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the ones reaped
    cpu = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    rss, vms = own[1], own[2]
    worker_cpu = CounterMetricFamily("flyproxy_worker_cpu_seconds", "CPU time of a worker "
                                     "process (user and system), by worker index and "
                                     "generation", labels=["worker", "generation"])
    worker_rss = GaugeMetricFamily("flyproxy_worker_resident_memory_bytes", "Resident memory "
                                   "of a worker process, by worker index and generation",
                                   labels=["worker", "generation"])
    for index, generation, pid in workers or ():
        row = stat(pid)
        if row is None:
            continue  # gone meanwhile: its CPU is the children's once it is reaped
        cpu, rss, vms = cpu + row[0], rss + row[1], vms + row[2]
        worker_cpu.add_metric([str(index), str(generation)], row[0])
        worker_rss.add_metric([str(index), str(generation)], row[1])
    scope = " (the supervisor and its workers)" if workers is not None else ""
    for cls, name, doc, value in (
            (CounterMetricFamily, "process_cpu_seconds", "Total user and system CPU time "
             "spent in seconds" + scope, cpu),
            (GaugeMetricFamily, "process_resident_memory_bytes", "Resident memory size in "
             "bytes" + scope, rss),
            (GaugeMetricFamily, "process_virtual_memory_bytes", "Virtual memory size in bytes"
             + scope, vms),
            (GaugeMetricFamily, "process_start_time_seconds", "Start time of the process "
             "since unix epoch in seconds", own[3]),
            (GaugeMetricFamily, "process_open_fds", "Number of open file descriptors" + scope,
             fds[0]),
            (GaugeMetricFamily, "process_max_fds", "Maximum number of open file descriptors "
             "(of each process: LimitNOFILE)", fds[1])):
        family = cls(name, doc)
        family.add_metric([], value)
        yield family
    if workers is not None:
        yield worker_cpu
        yield worker_rss
