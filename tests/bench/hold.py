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

def open_all(held: dict, n: int, dest: tuple[str, int], srcs: list[str],
             timeout_s: float = OPEN_TIMEOUT_S) -> dict:
    """Open ``n`` connections to ``dest`` (at most WINDOW at once), each with one echo;
    the open ones go in ``held`` (fd -> socket). Returns counts and errors by name."""
    ep = select.epoll()
    pending: dict[int, list] = {}  # fd -> [socket, sent?, started]
    errors: collections.Counter = collections.Counter()
    started = 0

    def fail(fd: int, why: str) -> None:
        s = pending.pop(fd)[0]
        ep.unregister(fd)
        s.close()
        errors[why] += 1

    while started < n or pending:
        now = time.monotonic()
        while started < n and len(pending) < WINDOW:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((srcs[started % len(srcs)], 0))
            s.setblocking(False)
            started += 1
            err = s.connect_ex(dest)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                errors[errno.errorcode.get(err, str(err))] += 1
                continue
            pending[s.fileno()] = [s, False, now]
            ep.register(s.fileno(), select.EPOLLOUT)
        for fd, _ in ep.poll(0.2):
            entry = pending[fd]
            s = entry[0]
            if not entry[1]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(fd, errno.errorcode.get(err, str(err)))
                    continue
                try:
                    s.send(b"o")
                except OSError as e:
                    fail(fd, errno.errorcode.get(e.errno, str(e.errno)))
                    continue
                entry[1] = True
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(16)
            except OSError as e:
                fail(fd, errno.errorcode.get(e.errno, str(e.errno)))
                continue
            if data != b"o":
                fail(fd, "closed" if not data else "garbled")
                continue
            ep.unregister(fd)
            held[fd] = pending.pop(fd)[0]
        now = time.monotonic()
        for fd in [fd for fd, e in pending.items() if now - e[2] > timeout_s]:
            fail(fd, "timed out")
    ep.close()
    return {"opened": n - sum(errors.values()), "errors": dict(errors)}


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
    ep = select.epoll()
    pending: dict[int, list] = {}  # fd -> [socket, sent?, started]
    errors: collections.Counter = collections.Counter()
    tried = ok = 0
    stopping = False
    next_at = time.monotonic()

    def fail(fd: int, why: str) -> None:
        ep.unregister(fd)
        pending.pop(fd)[0].close()
        errors[why] += 1

    while not stopping or pending:
        now = time.monotonic()
        if not stopping and chan.poll():
            chan.recv()
            stopping, deadline = True, now + PROBE_TIMEOUT_S
        if stopping and now > deadline:
            for fd in list(pending):
                fail(fd, "timed out")
            break
        if not stopping and now >= next_at:
            next_at = now + PROBE_EVERY_S
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((src, 0))
            s.setblocking(False)
            tried += 1
            err = s.connect_ex(dest)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                errors[errno.errorcode.get(err, str(err))] += 1
            else:
                pending[s.fileno()] = [s, False, now]
                ep.register(s.fileno(), select.EPOLLOUT)
        for fd, _ in ep.poll(PROBE_EVERY_S / 2):
            entry = pending[fd]
            s = entry[0]
            if not entry[1]:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(fd, errno.errorcode.get(err, str(err)))
                    continue
                try:
                    s.send(b"p")
                except OSError as e:  # reset by a listener closing with it in its queue
                    fail(fd, errno.errorcode.get(e.errno, str(e.errno)))
                    continue
                entry[1] = True
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(16)
            except OSError as e:
                fail(fd, errno.errorcode.get(e.errno, str(e.errno)))
                continue
            if data != b"p":
                fail(fd, "closed" if not data else "garbled")
                continue
            ep.unregister(fd)
            pending.pop(fd)[0].close()
            ok += 1
        for fd in [fd for fd, e in pending.items() if time.monotonic() - e[2] > PROBE_TIMEOUT_S]:
            fail(fd, "timed out")
    chan.send({"tried": tried, "ok": ok, "errors": dict(errors)})


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
