from __future__ import annotations

import pytest

from helpers import ProxyProcess, TaggedBackend


@pytest.fixture
def start_proxy(tmp_path):
    """Start ``flyproxy serve`` on a config; every proxy started is killed at teardown."""
    procs: list[ProxyProcess] = []

    def start(config, *args, **kw) -> ProxyProcess:
        proc = ProxyProcess(config, *args, **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def make_backend():
    """Start tagged echo backends on loopback; all are stopped at teardown."""
    servers: list[TaggedBackend] = []

    def make(tag: str, port: int = 0) -> TaggedBackend:
        server = TaggedBackend(tag, port)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
