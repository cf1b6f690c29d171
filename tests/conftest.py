from __future__ import annotations

import pytest

from helpers import ProxyProcess, TaggedBackend


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["uvloop", "asyncio"]


@pytest.fixture(params=_loops())
def start_proxy(tmp_path, request):
    """Start ``flyproxy serve`` on a config, once per event loop we ship (uvloop and
    asyncio's own); every proxy started is killed at teardown."""
    procs: list[ProxyProcess] = []

    def start(config, *args, **kw) -> ProxyProcess:
        kw["env"] = {**kw.get("env", {}), "FLYPROXY_LOOP": request.param}
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
