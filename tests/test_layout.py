"""The tree as a maintainer meets it: no import cycles, the privileged side never in the
proxy, one place per setting, the asyncio internals the engine relies on, a complete wheel."""

from __future__ import annotations

import ast
import os
import asyncio
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from appliance.dataplane import loop
from appliance.settings import ServeConfig, add_arguments, default_control
from helpers import PYTHON, REPO

PACKAGE = REPO / "appliance"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_at_import_time(path: Path) -> set[str]:
    """The appliance modules ``path`` imports when it is imported (module level; not
    inside functions, nor under ``if TYPE_CHECKING``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("appliance")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("appliance"):
                continue
            for a in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{a.name}"
                found.add(sub if (REPO / (sub.replace(".", "/") + ".py")).exists()
                          or (REPO / sub.replace(".", "/")).is_dir() else target)
    return found - {name}


def test_no_import_cycles():
    graph = {module_name(p): imports_at_import_time(p) for p in PACKAGE.rglob("*.py")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "active"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "active":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def every_import(path: Path) -> set[str]:
    """The modules ``path`` names in any import, anywhere (in functions, under
    TYPE_CHECKING), as written (``.tunnel``, ``..metrics``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


@pytest.mark.parametrize("module, below", [
    ("dataplane/epoll.py", ()),  # the constants: a leaf
    ("dataplane/engine.py", (".tunnel", ".relay", ".proxy")),  # fds and handlers only
    ("dataplane/relay.py", (".proxy",)),  # (a tunnel's type, for the annotations)
    ("metrics.py", (".dataplane", "appliance.dataplane")),  # counts; the data plane calls it
])
def test_the_data_plane_imports_downward_only(module, below):
    """Lower layers never reach up, not even in a function or for a type: the epoll
    constants import nothing of ours, the engine knows no connection, metrics no checks."""
    imported = every_import(PACKAGE / module)
    ours = {m for m in imported if m.startswith(".") or m.startswith("appliance")}
    assert (ours if not below else {m for m in ours if m.startswith(below)}) == set()


def test_the_proxy_imports_nothing_privileged():
    """What `flyproxy serve` imports (the single process, the supervisor, a worker) has no
    bcc and none of the BPF control plane's modules (loader, state, syscalls, commands)."""
    code = ("import sys, appliance.cli, appliance.service.launch; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert "bcc" not in out
    assert [m for m in out if m.startswith("appliance.bpf.")] == []
    assert "appliance.dataplane.proxy" in out  # (it did import the data plane)


def test_the_asyncio_internals_the_engine_relies_on_are_there():
    """dataplane/loop.py reads four private attributes of asyncio's loop; a Python upgrade
    that changes them fails here, by name, not somewhere in the relay."""
    event_loop = asyncio.SelectorEventLoop(loop.EngineSelector())
    try:
        assert loop.check(event_loop) == []
    finally:
        event_loop.close()


def test_every_serve_option_has_one_command_line_form_that_round_trips(monkeypatch):
    """A worker, and a supervisor re-executed by an upgrade, get exactly these options:
    what ``to_argv`` writes parses back to the same, whatever the environment says."""
    import argparse

    for variable in ("FLYPROXY_CONFIG", "FLYPROXY_METRICS", "FLYPROXY_LOG_LEVEL",
                     "FLYPROXY_CONN_LOG_LEVEL", "FLYPROXY_WORKERS"):
        monkeypatch.delenv(variable, raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser, "serve", "global", "internal")
    changed = ServeConfig(config="/x/c.json", fd=(3, 4), listen="[::1]:80", control=None,
                          metrics="127.0.0.1:9", watch=True, log_level="debug",
                          host="127.0.0.9", workers=3, connect_timeout_s=1.5, splice_after=7,
                          keepalive_probes=9, dns_stale_s=12.0, conn_log_level="off",
                          conn_log_interval_s=60.0, conn_log_sample=10, loop="asyncio",
                          worker_channel=5, config_fd=6, generation=7, collect_metrics=True,
                          resume_fd=8)
    assert ServeConfig.from_args(parser.parse_args(changed.to_argv())) == changed
    assert ServeConfig.from_args(parser.parse_args([])) == ServeConfig(control=default_control())
    # the environment gives defaults, and an explicit argv wins over it (even "none")
    monkeypatch.setenv("FLYPROXY_METRICS", "127.0.0.1:1")
    monkeypatch.setenv("FLYPROXY_CONFIG", "/env/config.json")
    monkeypatch.setenv("FLYPROXY_CONN_LOG_LEVEL", "debug")
    parser = argparse.ArgumentParser()
    add_arguments(parser, "serve", "global", "internal")
    from_env = ServeConfig.from_args(parser.parse_args([]))
    assert (from_env.metrics, from_env.config, from_env.conn_log_level) == \
        ("127.0.0.1:1", "/env/config.json", "debug")
    assert ServeConfig.from_args(parser.parse_args(ServeConfig().to_argv())) == ServeConfig()
    flags = [f.metadata["flag"] for f in ServeConfig.options()]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("variable, value, why", [
    ("FLYPROXY_LOG_LEVEL", "bogus", "expected one of debug, info, warning, error"),
    ("FLYPROXY_CONN_LOG_SAMPLE", "0", "0: expected a whole number, 1 or more"),
    ("FLYPROXY_CONN_LOG_INTERVAL", "soon", "could not convert string to float")])
def test_a_bad_environment_variable_is_one_clear_line(monkeypatch, capsys, variable, value,
                                                      why):
    from appliance.cli import build_parser

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        build_parser()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"${variable}='{value}': " in err and why in err, err
    assert "Traceback" not in err


def test_a_level_in_capitals_is_a_level(monkeypatch):
    from appliance.cli import build_parser

    monkeypatch.setenv("FLYPROXY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("FLYPROXY_CONN_LOG_LEVEL", "OFF")
    args = build_parser().parse_args(["serve"])
    assert (args.log_level, args.conn_log_level) == ("debug", "off")


def test_a_wheel_built_from_pyproject_is_complete(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build/ could hold files of older builds
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "docs", "tests", ".vagrant"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "-w", str(tmp_path), str(source)],
                            capture_output=True, text=True, timeout=300)
    if "No module named" in result.stderr and "wheel" in result.stderr:
        pytest.fail("python3-wheel missing: make test installs it")
    assert result.returncode == 0, result.stderr
    wheel, = tmp_path.glob("flyproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {module_name(p).replace(".", "/") + ("/__init__.py" if p.name == "__init__.py"
                                                     else ".py") for p in PACKAGE.rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert {"appliance/config.schema.json", "appliance/bpf/steer.c"} <= names
    steer = zipfile.ZipFile(wheel).read("appliance/bpf/steer.c").decode()
    assert steer == (REPO / "bpf" / "steer.c").read_text()  # the file, not a link to it


def test_the_bpf_commands_know_their_system_calls_on_each_architecture(monkeypatch):
    """The package is Architecture: all: bpf(2) has another number on arm64 than on
    x86_64, and an architecture without one is refused by name, not by a wrong call."""
    from appliance.bpf import syscalls

    assert syscalls._SYSCALLS["x86_64"][0] == 321 and syscalls._SYSCALLS["aarch64"][0] == 280
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(("Linux", "h", "6", "1", "riscv64")))
    try:
        syscalls._numbers()
    except OSError as e:
        assert "riscv64" in str(e) and "x86_64" in str(e)
    else:
        raise AssertionError("an unknown architecture was accepted")
