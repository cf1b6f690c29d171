"""The relay's connect logic in-process, for what a whole proxy cannot show from outside:
a host name with several addresses, a resolver that never answers, a client that resets
while its backend is still connecting; and the event loop's own work (timers) while its
wait is the engine's.

Real sockets and a real engine, on both ways the engine meets asyncio's loop (its epoll set
as the loop's wait, and nested in a plain loop); only the resolver is replaced (a name with
two addresses, or a stuck DNS server, cannot be had on this machine's loopback).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import os
import socket
import struct
import time

import pytest
from helpers import dead_port

from appliance import config
from appliance.config import Target
from appliance.dataplane.balancer import Health
from appliance.dataplane.engine import Engine, big_pipe_budget
from appliance.dataplane.loop import EngineSelector
from appliance.dataplane.proxy import Proxy
from appliance.dataplane.relay import End
from appliance.dataplane.resolver import Name, Resolver
from appliance.dataplane.tunnel import Tunnel
from appliance.settings import ServeConfig


@pytest.fixture(params=["engine-selector", "nested"])
def run(request):
    """asyncio.run on the loop the proxy ships (its wait is the engine's epoll set), or on a
    plain asyncio loop that watches the engine's set as one more fd (as uvloop does)."""
    def run(coro):
        if request.param == "nested":
            return asyncio.run(coro)
        with asyncio.Runner(
                loop_factory=lambda: asyncio.SelectorEventLoop(EngineSelector())) as runner:
            return runner.run(coro)
    return run


class Owner:
    """What the proxy hears from a tunnel, recorded."""

    def __init__(self) -> None:
        self.connected_to = None
        self.done = asyncio.Event()
        self.ended = asyncio.Event()

    def connected(self, tunnel: Tunnel, seconds: float) -> None:
        self.connected_to = tunnel.target
        self.done.set()

    def all_failed(self, tunnel: Tunnel) -> None:
        self.done.set()
        tunnel.close()

    def no_resources(self, tunnel: Tunnel, exc: OSError) -> None:
        self.done.set()
        tunnel.close()

    def closed(self, tunnel: Tunnel) -> None:
        self.done.set()
        self.ended.set()


@contextlib.contextmanager
def silent_target():
    """A target that drops our SYNs: a listener whose accept queue is full."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    fillers = []
    try:
        for _ in range(3):  # backlog 0 holds one; the SYNs after that are dropped
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(silent.getsockname())
            fillers.append(f)
        yield Target(*silent.getsockname())
    finally:
        for f in fillers:
            f.close()
        silent.close()


def start_tunnel(targets, connect_timeout_s, engine=None, splice_after=0, resolver=None):
    """A client connection handed to a Tunnel that starts connecting to ``targets``;
    returns (owner, tunnel, health, client, engine)."""
    engine = engine or Engine(asyncio.get_running_loop(), connect_timeout_s,
                              Tunnel.connect_timed_out)
    front = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(front.getsockname(), timeout=5)
    accepted, addr = front.accept()
    port = front.getsockname()[1]
    front.close()
    accepted.setblocking(False)
    owner, health = Owner(), Health()
    tunnel = Tunnel(engine, owner, accepted, addr, "app", port, splice_after)
    tunnel.connect(targets, health, resolver)
    return owner, tunnel, health, client, engine


def known_names(**answers) -> Resolver:
    """A resolver whose names are set by hand (no query is sent): ``name=[addresses]``, or
    ``name=None`` for a name still pending (never answered)."""
    resolver = Resolver(asyncio.get_running_loop())
    for host, addrs in answers.items():
        name = resolver.names[host.replace("_", ".")] = Name(host.replace("_", "."))
        if addrs is not None:
            name.addrs = tuple((socket.AF_INET6 if ":" in a else socket.AF_INET, a)
                               for a in addrs)
            name.state = "fresh"
    return resolver


def test_a_name_with_several_addresses_falls_through_to_the_one_that_answers(run):
    live = socket.create_server(("127.0.0.1", 0))

    async def main():
        # both addresses of the name on one port: the first refuses, the second listens
        port = live.getsockname()[1]
        refuser = socket.create_server(("127.0.0.2", port))
        refuser.close()  # now 127.0.0.2:port refuses
        target = Target("two.addresses.test", port)
        resolver = known_names(two_addresses_test=["127.0.0.2", "127.0.0.1"])
        owner, tunnel, health, client, engine = start_tunnel([target], 2.0, resolver=resolver)
        await asyncio.wait_for(owner.done.wait(), 10)
        assert owner.connected_to == target
        assert tunnel.failures == []  # one address refusing is not the target failing
        assert health.describe(target) == "ok"
        backend, _ = live.accept()
        backend.sendall(b"through\n")
        client.setblocking(False)  # read while the engine runs
        got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 100), 5)
        assert got == b"through\n"
        tunnel.close()
        engine.close()
        client.close()
        backend.close()

    run(main())


def test_a_name_never_answered_costs_one_connect_timeout(run):
    live = socket.create_server(("127.0.0.1", 0))
    stuck = Target("stuck.resolver.test", 80)
    good = Target(*live.getsockname())

    async def main():
        loop = asyncio.get_running_loop()
        started = loop.time()
        resolver = known_names(stuck_resolver_test=None)  # pending, and stays so
        owner, tunnel, health, client, engine = start_tunnel([stuck, good], 0.3,
                                                             resolver=resolver)
        await asyncio.wait_for(owner.done.wait(), 10)
        assert owner.connected_to == good
        assert tunnel.failures == [(stuck, "timeout")]
        assert health.describe(stuck).startswith("ejected: timeout")
        assert 0.3 <= loop.time() - started < 5
        tunnel.close()
        engine.close()
        client.close()

    run(main())


def test_a_connection_waiting_on_a_first_answer_goes_on_when_it_comes(run):
    live = socket.create_server(("127.0.0.1", 0))
    late = Target("late.test", live.getsockname()[1])

    async def main():
        resolver = known_names(late_test=None)
        owner, tunnel, _, client, engine = start_tunnel([late], 5.0, resolver=resolver)
        name = resolver.names["late.test"]
        assert len(name.waiters) == 1 and owner.connected_to is None
        resolver._succeeded(name, ((socket.AF_INET, "127.0.0.1"),), 30)  # the answer
        await asyncio.wait_for(owner.done.wait(), 5)
        assert owner.connected_to == late and tunnel.failures == []
        assert name.waiters == []
        tunnel.close()
        engine.close()
        client.close()
        resolver.close()

    run(main())


def test_a_client_reset_while_connecting_abandons_the_attempt_at_once(run):
    """The target drops our SYNs (its accept queue is full); the client resets meanwhile:
    the tunnel closes now, not after the connect timeout, and leaves no deadline behind."""
    async def main(silent):
        loop = asyncio.get_running_loop()
        owner, tunnel, _, client, engine = start_tunnel([silent], 30.0)
        assert tunnel in engine.connecting
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()  # linger 0: RST
        started = loop.time()
        await asyncio.wait_for(owner.done.wait(), 10)
        assert loop.time() - started < 5  # not the 30 s connect timeout
        assert owner.connected_to is None
        assert tunnel.close_reason == "client-reset"
        assert not engine.connecting and tunnel.racing == []
        engine.close()

    with silent_target() as silent:
        run(main(silent))


def test_a_bug_in_the_relay_resets_that_connection_and_the_others_go_on(run, monkeypatch,
                                                                        caplog):
    """A handler that raises (a bug: here reading one client's bytes) costs that connection
    only: the engine logs it and has the handler end its connection (both sides reset), and
    goes on relaying the others."""
    buggy = []
    read = End.read

    def read_or_raise(end, *args):
        if end.tunnel in buggy:
            raise RuntimeError("a bug in the relay")
        return read(end, *args)

    monkeypatch.setattr(End, "read", read_or_raise)

    async def main():
        loop = asyncio.get_running_loop()
        live = socket.create_server(("127.0.0.1", 0))
        live.setblocking(False)
        engine = Engine(loop, 2.0, Tunnel.connect_timed_out)
        pairs = []
        try:
            for _ in range(2):
                owner, tunnel, _, client, _ = start_tunnel([Target(*live.getsockname())], 2.0,
                                                           engine)
                await asyncio.wait_for(owner.done.wait(), 10)
                backend, _ = await asyncio.wait_for(loop.sock_accept(live), 5)
                client.setblocking(False)
                pairs.append((owner, tunnel, client, backend))
            (owner, tunnel, client, backend), (_, other, client2, backend2) = pairs
            buggy.append(tunnel)
            await loop.sock_sendall(client, b"boom")
            await asyncio.wait_for(owner.ended.wait(), 5)
            assert tunnel.close_reason == "error"
            with pytest.raises(ConnectionResetError):  # reset, not a clean EOF
                await asyncio.wait_for(loop.sock_recv(client, 100), 5)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(backend, 100), 5)
            assert "unexpected error on fd" in caplog.text and "a bug in the relay" in caplog.text
            await loop.sock_sendall(client2, b"still here")  # the other connection goes on
            assert await asyncio.wait_for(loop.sock_recv(backend2, 100), 5) == b"still here"
            assert not other.done
        finally:
            for _, t, c, b in pairs:
                t.close()
                c.close()
                b.close()
            live.close()
            engine.close()

    run(main())


def test_bulk_directions_get_1_mib_pipes_up_to_the_process_share_then_256_kib(run):
    """A 1 MiB pipe halves the splice() calls per GB, but counts four times a 256 KiB one
    against the user's pipe quota: a process sizes only its share of pipes at 1 MiB, and a
    closed connection gives its share back."""
    async def main():
        loop = asyncio.get_running_loop()
        live = socket.create_server(("127.0.0.1", 0))
        engine = Engine(loop, 2.0, Tunnel.connect_timed_out)
        engine.big_pipes = 1  # this process's share: one 1 MiB pipe
        tunnels, clients, backends = [], [], []

        async def bulk_connection():
            owner, tunnel, _, client, _ = start_tunnel([Target(*live.getsockname())], 2.0,
                                                       engine, splice_after=1)
            await asyncio.wait_for(owner.done.wait(), 10)
            backend, _ = live.accept()
            client.setblocking(False)
            backend.setblocking(False)
            await loop.sock_sendall(client, b"x" * 4096)  # past splice_after: a pipe
            got = 0
            while got < 4096:  # through the proxy, unchanged
                got += len(await asyncio.wait_for(loop.sock_recv(backend, 65536), 5))
            tunnels.append(tunnel)
            clients.append(client)
            backends.append(backend)
            pipes = [e.pipe_w for e in (tunnel.client, tunnel.backend) if e.pipe_w >= 0]
            assert len(pipes) == 1, "only the client's direction carried bytes"
            return fcntl.fcntl(pipes[0], fcntl.F_GETPIPE_SZ)

        try:
            assert await bulk_connection() == 1 << 20
            assert engine.big_pipes == 0
            assert await bulk_connection() == 256 * 1024  # the share is used up
            tunnels.pop(0).close()
            assert engine.big_pipes == 1  # given back with its pipe
            assert await bulk_connection() == 1 << 20
            tunnels[0].close()
            assert engine.big_pipes == 0  # a 256 KiB pipe gives nothing back
        finally:
            for t in tunnels:
                t.close()
            for s in clients + backends + [live]:
                s.close()
            engine.close()

    run(main())


def test_the_selector_returns_to_the_loop_for_a_timer_an_event_added():
    """On the shipped loop the relay's events are handled inside the selector's wait, which
    stays there while only relay events come. A connect started by an accept event adds the
    loop's first timer (its timeout): the wait must end then, or the loop would not wake for
    that timer until its own timeout (here 5 s)."""
    loop = asyncio.SelectorEventLoop(EngineSelector())
    engine = Engine(loop, 0.3, Tunnel.connect_timed_out)
    listener = client = None
    try:
        with silent_target() as silent:
            tunnels = []

            def on_accept(sock, addr, port):
                tunnels.append(Tunnel(engine, Owner(), sock, addr, "app", port))
                tunnels[-1].connect([silent], Health())

            listener = engine.listen(socket.create_server(("127.0.0.1", 0)), 1, on_accept)
            client = socket.create_connection(listener.sock.getsockname(), timeout=5)
            assert not loop._scheduled
            started = time.monotonic()
            assert loop._selector.select(5) == []  # the accept: the engine's, not the loop's
            assert time.monotonic() - started < 2
            assert len(tunnels) == 1 and loop._scheduled  # the connect's deadline
            tunnels[0].close()
    finally:
        if listener is not None:
            listener.close()
        if client is not None:
            client.close()
        engine.close()
        loop.close()


def test_the_share_of_1_mib_pipes_follows_the_users_pipe_quota(tmp_path):
    quota = tmp_path / "pipe-user-pages-soft"
    quota.write_text("16384\n")  # the kernel's default: 64 MiB of 4 KiB pages
    assert big_pipe_budget(str(quota)) == 8  # an eighth of it in 1 MiB pipes
    quota.write_text("1\n")
    assert big_pipe_budget(str(quota)) == 0
    quota.write_text("0\n")  # no quota
    assert big_pipe_budget(str(quota)) >= 1 << 20


def test_a_closed_connection_is_freed_at_once_not_left_to_the_garbage_collector(run):
    """A connection's objects point at each other (the ends, their tunnel). Closed, they must
    be freed by reference counting at once: leaving them to Python's cyclic collector costs
    CPU per connection and memory until it runs. Every way a connection ends, in-process
    through a whole Proxy: both sides half-close, a bulk transfer through splice(), a client
    reset, every target down (a refused connect); the first app also has a dead target
    beside its live one."""
    async def main():
        loop = asyncio.get_running_loop()
        backend = socket.create_server(("127.0.0.1", 0))
        backend.setblocking(False)
        live, dead = backend.getsockname()[1], dead_port()

        async def echo(conn):
            with conn:
                while data := await loop.sock_recv(conn, 65536):
                    await loop.sock_sendall(conn, data)

        async def serve():
            while True:
                conn, _ = await loop.sock_accept(backend)
                loop.create_task(echo(conn))

        server = loop.create_task(serve())
        front = socket.create_server(("127.0.0.1", 0))
        front_down = socket.create_server(("127.0.0.1", 0))
        cfg = config.loads(json.dumps({"Apps": [
            {"Name": "up", "Ports": [front.getsockname()[1]],
             "Targets": [f"127.0.0.1:{dead}", f"127.0.0.1:{live}"]},
            {"Name": "down", "Ports": [front_down.getsockname()[1]],
             "Targets": [f"127.0.0.1:{dead}"]}]}))
        proxy = Proxy(cfg, ServeConfig(splice_after=64 * 1024))
        await proxy.start([front, front_down])  # handed in: routed by the port dialled

        async def client(sock_addr, payload=b"", reset=False):
            s = socket.socket()
            s.setblocking(False)
            with s:
                async with asyncio.timeout(10):
                    await loop.sock_connect(s, sock_addr)
                    if reset:
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return
                    await loop.sock_sendall(s, payload)
                    s.shutdown(socket.SHUT_WR)
                    got = b""
                    while data := await loop.sock_recv(s, 1 << 20):
                        got += data
                    assert got == payload

        was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()  # from here only our collect() below finds what references did not free
        try:
            for _ in range(5):
                await client(front.getsockname(), b"hello")
            await client(front.getsockname(), os.urandom(1 << 20))  # splice() past 64 KiB
            await client(front.getsockname(), reset=True)
            await client(front_down.getsockname())  # refused by the only target: closed
            assert await proxy.drain(10) == 0, "connections still open after 10 s"
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, (Tunnel, End))]
            assert not left, f"{len(left)} connection objects left to the garbage collector"
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            if was_enabled:
                gc.enable()
            server.cancel()
            proxy.stop_accepting()
            await proxy.drain(1)
            backend.close()

    run(main())
