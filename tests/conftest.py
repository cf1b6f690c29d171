from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import ProxyProcess, TaggedBackend

# Under CI=true a skipped test fails the run, unless its reason starts with one of these:
# a resource this kind of machine cannot have, whatever `make test` installs. Everything
# else a test needs (root, nginx, haproxy, vagrant, uvloop...) CI has, so a skip there
# means a test that claims to run and does not. FLYPROXY_VM_TEST=0 is an opt-out for local
# runs only: under CI=true the VM tests run.
ALLOWED_SKIPS = {
    "needs an open-file limit of": "a container whose hard RLIMIT_NOFILE is capped below "
                                   "what the test holds open, without the right to raise it",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def _disallowed(report) -> str | None:
    """The reason of a skip CI does not accept (None: not a skip, or an allowed one)."""
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    reason = reason.removeprefix("Skipped: ")
    return None if reason.startswith(tuple(ALLOWED_SKIPS)) else reason


def _fail(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, where only these skips are allowed "
                       f"(tests/conftest.py ALLOWED_SKIPS): {sorted(ALLOWED_SKIPS)}; "
                       f"this one said: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = _disallowed(report)
    if reason is not None:
        _fail(report, reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    reason = _disallowed(report)
    if reason is not None:
        _fail(report, reason)


def pytest_terminal_summary(terminalreporter):
    if in_ci():
        terminalreporter.write_line(f"CI=true: a skip fails the run unless its reason starts "
                                    f"with one of {sorted(ALLOWED_SKIPS)}")


def _loops() -> list[str]:
    if in_ci():  # both, always: a missing uvloop fails its tests instead of dropping them
        return ["uvloop", "asyncio"]
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


@pytest.fixture(autouse=True)
def _control_socket_of_its_own(tmp_path, monkeypatch):
    """`serve` opens a control socket by default (as root: /run/flyproxy/control.sock):
    every test's proxies and client commands default to one in its own directory."""
    monkeypatch.setenv("FLYPROXY_CONTROL", str(tmp_path / "control.sock"))


@pytest.fixture(scope="session")
def bpffs():
    """A private bpffs mount for pins (``ip netns exec`` remounts /sys, so /sys/fs/bpf won't do)."""
    mnt = Path(tempfile.mkdtemp(prefix="flyproxy-bpffs-"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)
    mnt.rmdir()
