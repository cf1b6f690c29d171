"""The bench's scale phase: many concurrent connections held through one proxy.

Clients and the echo backend are plain epoll loops in forked processes (no asyncio: at
100,000 connections the load generator must cost little beside the proxy). Every client
connection binds a source address of its own range with IP_BIND_ADDRESS_NO_PORT, and the
backend listens on several addresses, so neither side's 4-tuples run out: a source
address gives ~28,000 ports per destination (net.ipv4.ip_local_port_range).

A connection counts as *open* once one byte went through the proxy to the backend and
back; *held* once, after all are open, a second byte went round on every one of them.
Every wait is bounded; what did not answer in time is counted as failed, never waited for.
"""

from __future__ import annotations

import collections
import errno
import multiprocessing
import os
import select
import socket
import time

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h; not in Python's socket module
WINDOW = 500  # connections being opened at once, per client process (all: under the backlog)
OPEN_TIMEOUT_S = 15.0  # one connection: connect and first echo (SYN retries at 1, 3, 7 s)
ECHO_TIMEOUT_S = 60.0  # every held connection's second echo
FD_MARGIN = 1000  # fds a process keeps for itself beside its share of connections


def fd_limit() -> int:
    """The hard limit on fds per process (RLIMIT_NOFILE): what each process may raise to."""
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def processes_for(fds: int, limit: int | None = None, spread: float = 1.1) -> int:
    """How many processes share ``fds`` fds so none passes the limit (with room for an
    uneven spread: the kernel's hash spreads connections over SO_REUSEPORT sockets)."""
    per_process = (limit or fd_limit()) - FD_MARGIN
    return max(1, -(-int(fds * spread) // per_process))


def sources(n: int = 16) -> list[str]:
    """Client source addresses (loopback's 127.0.0.0/8 has plenty)."""
    return [f"127.0.2.{i}" for i in range(1, n + 1)]


def backends(n: int = 8, port: int = 7171) -> list[tuple[str, int]]:
    """The hold backend's addresses: 100,000 proxy-to-backend connections need more than
    one destination (about 28,000 source ports each)."""
    return [(f"127.0.3.{i}", port) for i in range(1, n + 1)]


# -- the echo backend --------------------------------------------------------------------

def _raise_fd_limit() -> None:
    import resource
    hard = fd_limit()
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _echo_main(addresses: list[tuple[str, int]], ready) -> None:
    _raise_fd_limit()
    ep = select.epoll()
    listeners, conns = {}, {}
    for addr in addresses:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # one per process
        s.bind(addr)
        s.listen(4096)
        s.setblocking(False)
        listeners[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLIN)
    ready.send("ready")
    while True:
        for fd, _ in ep.poll(1.0):
            if fd in listeners:
                for _ in range(512):
                    try:
                        c, _ = listeners[fd].accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN)
                continue
            c = conns[fd]
            try:
                data = c.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    c.send(data)  # a byte or two at a time: the send buffer never fills
                except OSError:
                    pass
            else:
                ep.unregister(fd)
                del conns[fd]
                c.close()


class EchoBackend:
    """An echo server on ``addresses`` in ``processes`` forked processes (SO_REUSEPORT:
    the kernel spreads connections over them)."""

    def __init__(self, addresses: list[tuple[str, int]], processes: int = 1):
        ctx = multiprocessing.get_context("fork")
        self.procs = []
        for _ in range(processes):
            parent, child = multiprocessing.Pipe()
            proc = ctx.Process(target=_echo_main, args=(addresses, child), daemon=True)
            proc.start()
            self.procs.append(proc)
            if not parent.poll(10) or parent.recv() != "ready":
                self.stop()
                raise RuntimeError("the hold echo backend did not start")

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.join(10)


# -- the clients -------------------------------------------------------------------------

class Opening:
    """Connections under way, each to be opened and then to echo ``byte`` once: started
    with :meth:`start`, moved on by :meth:`poll` (which hands back the ones that echoed,
    open), failed (counted in ``errors`` by name) when they error, close or time out."""

    def __init__(self, dest: tuple[str, int], byte: bytes, timeout_s: float):
        self.dest, self.byte, self.timeout_s = dest, byte, timeout_s
        self.ep = select.epoll()
        self.pending: dict[int, list] = {}  # fd -> [socket, sent?, started]
        self.errors: collections.Counter = collections.Counter()

    def start(self, src: str) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((src, 0))
        s.setblocking(False)
        err = s.connect_ex(self.dest)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.errors[errno.errorcode.get(err, str(err))] += 1
            return
        self.pending[s.fileno()] = [s, False, time.monotonic()]
        self.ep.register(s.fileno(), select.EPOLLOUT)

    def fail(self, fd: int, why: str) -> None:
        self.ep.unregister(fd)
        self.pending.pop(fd)[0].close()
        self.errors[why] += 1

    def poll(self, timeout_s: float) -> list[socket.socket]:
        done = []
        for fd, _ in self.ep.poll(timeout_s):
            entry = self.pending[fd]
            s = entry[0]
            try:
                if not entry[1]:  # writable: connected, or failed
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.fail(fd, errno.errorcode.get(err, str(err)))
                        continue
                    s.send(self.byte)
                    entry[1] = True
                    self.ep.modify(fd, select.EPOLLIN)
                    continue
                data = s.recv(16)
            except OSError as e:  # e.g. reset by a listener closing with it in its queue
                self.fail(fd, errno.errorcode.get(e.errno, str(e.errno)))
                continue
            if data != self.byte:
                self.fail(fd, "closed" if not data else "garbled")
                continue
            self.ep.unregister(fd)
            done.append(self.pending.pop(fd)[0])
        now = time.monotonic()
        for fd in [fd for fd, e in self.pending.items() if now - e[2] > self.timeout_s]:
            self.fail(fd, "timed out")
        return done

    def abandon(self) -> None:
        """Count what is still under way as timed out, and close it."""
        for fd in list(self.pending):
            self.fail(fd, "timed out")
        self.ep.close()


def open_all(held: dict, n: int, dest: tuple[str, int], srcs: list[str],
             timeout_s: float = OPEN_TIMEOUT_S) -> dict:
    """Open ``n`` connections to ``dest`` (at most WINDOW at once), each with one echo;
    the open ones go in ``held`` (fd -> socket). Returns counts and errors by name."""
    opening = Opening(dest, b"o", timeout_s)
    started = 0
    while started < n or opening.pending:
        while started < n and len(opening.pending) < WINDOW:
            opening.start(srcs[started % len(srcs)])
            started += 1
        for s in opening.poll(0.2):
            held[s.fileno()] = s
    opening.abandon()
    return {"opened": n - sum(opening.errors.values()), "errors": dict(opening.errors)}


def echo_all(held: dict, timeout_s: float = ECHO_TIMEOUT_S) -> dict:
    """One byte round every held connection; the ones that are closed or silent are
    dropped from ``held`` and counted."""
    ep = select.epoll()
    waiting = set()
    dead = 0
    for fd, s in list(held.items()):
        try:
            s.send(b"e")
        except OSError:
            dead += 1
            s.close()
            del held[fd]
            continue
        ep.register(fd, select.EPOLLIN)
        waiting.add(fd)
    deadline = time.monotonic() + timeout_s
    while waiting and time.monotonic() < deadline:
        for fd, _ in ep.poll(0.5):
            try:
                data = held[fd].recv(16)
            except OSError:
                data = b""
            ep.unregister(fd)
            waiting.discard(fd)
            if data != b"e":
                dead += 1
                held.pop(fd).close()
    silent = len(waiting)
    for fd in waiting:
        held.pop(fd).close()
    ep.close()
    return {"echoed": len(held), "dead": dead, "silent": silent}


def _client_main(chan, dest: tuple[str, int], srcs: list[str]) -> None:
    _raise_fd_limit()
    held: dict = {}
    while True:
        cmd, arg = chan.recv()
        if cmd == "open":
            chan.send(open_all(held, arg, dest, srcs))
        elif cmd == "echo":
            chan.send(echo_all(held))
        elif cmd == "close":
            for s in held.values():
                s.close()
            held.clear()
            chan.send({})
        else:
            return


class Clients:
    """Forked client processes, each holding its share of connections to ``dest``; every
    call goes to all of them and sums their answers."""

    def __init__(self, dest: tuple[str, int], processes: int = 2,
                 srcs: list[str] | None = None):
        srcs = srcs or sources()
        ctx = multiprocessing.get_context("fork")
        self.chans, self.procs = [], []
        for i in range(processes):
            parent, child = multiprocessing.Pipe()
            p = ctx.Process(target=_client_main, args=(child, dest, srcs[i::processes]),
                            daemon=True)
            p.start()
            self.chans.append(parent)
            self.procs.append(p)

    def call(self, cmd: str, arg: int = 0, timeout_s: float = 600) -> dict:
        n = len(self.chans)
        for i, chan in enumerate(self.chans):
            chan.send((cmd, arg // n + (1 if i < arg % n else 0)))
        total: dict = {}
        deadline = time.monotonic() + timeout_s
        for chan in self.chans:
            if not chan.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"hold clients: no answer to {cmd} in {timeout_s:g}s")
            for key, value in chan.recv().items():
                if isinstance(value, dict):
                    merged = total.setdefault(key, {})
                    for k, v in value.items():
                        merged[k] = merged.get(k, 0) + v
                else:
                    total[key] = total.get(key, 0) + value
        return total

    def stop(self) -> None:
        for chan in self.chans:
            try:
                chan.send(("quit", 0))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# -- kernel memory -----------------------------------------------------------------------

def kernel_socket_kib() -> int:
    """Slab memory plus TCP buffer memory (sockstat's pages), in KiB: what the kernel holds
    for sockets, machine-wide (sockstat's figure is not per namespace)."""
    slab = 0
    for line in open("/proc/meminfo"):
        if line.startswith("Slab:"):
            slab = int(line.split()[1])
    pages = 0
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            fields = line.split()
            pages = int(fields[fields.index("mem") + 1])
    return slab + pages * os.sysconf("SC_PAGE_SIZE") // 1024


# -- connections opened while a proxy restarts ---------------------------------------------

PROBE_EVERY_S = 0.02  # a new connection this often while the restart goes on
PROBE_TIMEOUT_S = 30.0  # each: connect and echo (queued in a held listener's backlog)


def _probe_main(chan, dest: tuple[str, int], src: str) -> None:
    """Open a connection every PROBE_EVERY_S (each echoing once) until told to stop, then
    wait for the ones under way (bounded); send back the counts."""
    opening = Opening(dest, b"p", PROBE_TIMEOUT_S)
    tried = ok = 0
    next_at, deadline = time.monotonic(), None
    while deadline is None or (opening.pending and time.monotonic() < deadline):
        now = time.monotonic()
        if deadline is None and chan.poll():
            chan.recv()
            deadline = now + PROBE_TIMEOUT_S
        if deadline is None and now >= next_at:
            next_at = now + PROBE_EVERY_S
            opening.start(src)
            tried += 1
        for s in opening.poll(PROBE_EVERY_S / 2):
            s.close()
            ok += 1
    opening.abandon()
    chan.send({"tried": tried, "ok": ok, "errors": dict(opening.errors)})


class Prober:
    """New connections to ``dest`` at a steady pace, from a forked process, while
    something happens to the proxy (a restart); :meth:`stop` returns the counts."""

    def __init__(self, dest: tuple[str, int], src: str = "127.0.4.1"):
        self.chan, child = multiprocessing.Pipe()
        self.proc = multiprocessing.get_context("fork").Process(
            target=_probe_main, args=(child, dest, src), daemon=True)
        self.proc.start()

    def stop(self) -> dict:
        self.chan.send("stop")
        if not self.chan.poll(PROBE_TIMEOUT_S + 10):
            self.proc.kill()
            raise RuntimeError("the restart prober did not answer")
        result = self.chan.recv()
        self.proc.join(10)
        return result
