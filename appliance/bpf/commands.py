"""What each ``flyproxy bpf ...`` command does (parsed in ``appliance/cli/bpf.py``): the
privileged, short-lived control plane for sk_lookup steering.

Nouns only read (``status``, ``metrics``); verbs change state (``load``, ``sync``,
``register``, ``unspread``, ``unload``). ``build`` compiles and verifies without
attaching. Only ``build`` and ``load`` compile (and import bcc); the rest are plain
bpf() calls.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from .. import config as configmod
from ..dataplane import listeners
from ..service.systemd import systemd_fds
from . import syscalls as sc
from .state import LANES, LANES_MAP, PinnedState, SteeringError, socket_cookie, unload


def _config(path: str) -> configmod.Config:
    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        raise SteeringError(str(e)) from None


def cmd_build(args) -> int:
    from . import loader

    module, prog_fd = loader.compile_program(Path(args.source), dump=args.dump)
    info = sc.prog_info(prog_fd)
    module.cleanup()
    print(f"{args.source}: compiled and verified: program {loader.FUNCTION}, tag {info['tag']} "
          "(not attached)")
    return 0


def cmd_load(args) -> int:
    from . import loader

    config = _config(args.config)
    print(f"{args.pin_dir}: {loader.load(config, Path(args.pin_dir), Path(args.source))}")
    return 0


def cmd_sync(args) -> int:
    config = _config(args.config)
    with PinnedState(args.pin_dir) as state:
        changed, removed = state.sync(config)
    print(f"{args.pin_dir}: port map synced to {args.config}: "
          f"{len(config.ports)} ports, {len(changed)} added or changed, {len(removed)} removed")
    return 0


def listening_sockets_of(pid: int, fd: int | None) -> list[socket.socket]:
    """Listening TCP sockets of process ``pid`` (just fd ``fd`` if given), via pidfd_getfd."""
    if fd is not None:
        candidates = [fd]
    else:  # the proxy opens and closes sockets meanwhile (checks, control requests, its
        # workers'): an fd gone (or no longer a socket) by the time we look is skipped
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            entries = list(fd_dir.iterdir())
        except OSError as e:
            raise SteeringError(f"cannot list fds of process {pid}: {e.strerror}") from None
        candidates = []
        for e in entries:
            try:
                if os.readlink(e).startswith("socket:"):
                    candidates.append(int(e.name))
            except OSError:
                continue  # closed since the listing
    found = []
    for n in candidates:
        try:
            taken = sc.pidfd_getfd(pid, n)
        except OSError as e:
            if fd is None and e.errno == errno.EBADF:
                continue  # closed since we listed it
            raise SteeringError(f"cannot take fd {n} of process {pid}: {e.strerror}") from None
        try:
            sock = socket.socket(fileno=taken)
        except OSError as e:
            os.close(taken)
            if fd is None:
                continue  # its number now holds something else than a socket
            raise SteeringError(f"fd {n} of process {pid} is not a socket: {e.strerror}") \
                from None
        try:
            listeners.check_listening_tcp(sock, f"fd {n} of process {pid}")
        except listeners.ListenerError as e:
            sock.close()
            if fd is not None:
                raise SteeringError(str(e)) from None
            continue
        found.append(sock)
    return found


def _listener(args) -> socket.socket:
    if args.pid is not None:
        return _proxy_listener(args)
    fds = [args.fd] if args.fd is not None else systemd_fds()
    if len(fds) != 1:
        raise SteeringError("say which socket to register: --fd N, --pid PID [--fd N], "
                            f"or exactly one socket from systemd (got {len(fds)})")
    try:
        return listeners.from_fd(fds[0])
    except listeners.ListenerError as e:
        raise SteeringError(str(e)) from None


def _proxy_listener(args) -> socket.socket:
    """The proxy's listening socket, taken from process ``--pid``: one the proxy itself
    names as its listener (its status, over ``--control``: never its metrics socket or
    another process's), narrowed by ``--fd``/``--port``. Waits up to ``--wait`` seconds
    for a proxy that is still starting."""
    from ..service import control

    deadline = time.monotonic() + args.wait
    while True:
        try:
            reply = control.request(args.control, "status", timeout_s=5)
            ours = {row["cookie"]: row["address"] for row in reply.get("listeners", [])}
            if not ours:
                raise SteeringError(f"the proxy at {args.control} has no handed-in listener "
                                    "(per-port mode binds every port itself: nothing to "
                                    "steer; serve --listen or socket activation has one)")
            found = listening_sockets_of(args.pid, args.fd)
            keep = [s for s in found if socket_cookie(s) in ours
                    and (args.port is None or s.getsockname()[1] == args.port)]
            for s in found:
                if s not in keep:
                    s.close()
            if len(keep) == 1:
                return keep[0]
            for s in keep:
                s.close()
            on_port = f" on port {args.port}" if args.port is not None else ""
            raise SteeringError(f"process {args.pid} holds {len(keep)} of the proxy's "
                                f"listeners{on_port} (the proxy at {args.control} names "
                                f"{', '.join(sorted(ours.values()))}); is --pid the proxy's?")
        except (control.ControlError, SteeringError) as e:
            if time.monotonic() >= deadline:
                raise SteeringError(str(e)) from None
            time.sleep(0.1)  # a proxy still starting: no event to wait on from here


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _lane_members(pid: int, listener: socket.socket) -> list[socket.socket]:
    """A member of each of the process's workers' groups (its lanes: one SO_REUSEPORT
    group per address, other than the listener), in the order of their ports. [] when it
    has none (a single process)."""
    found = [s for s in listening_sockets_of(pid, None)
             if s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
             and socket_cookie(s) != socket_cookie(listener)]
    members: dict[tuple, socket.socket] = {}
    for s in sorted(found, key=lambda s: s.getsockname()[1]):
        address = s.getsockname()[:2]
        if address in members:
            s.close()  # another member of a group we have one of
        else:
            members[address] = s
    return list(members.values())


def cmd_register(args) -> int:
    if args.spread and args.pid is None:
        raise SteeringError("--spread needs --pid (the proxy's main process)")
    sock = _listener(args)
    if sock.family == socket.AF_INET6 and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        print("warning: the listener is IPv6-only; IPv4 connections cannot be steered to it",
              file=sys.stderr)
    with PinnedState(args.pin_dir) as state, sock:
        cookie = state.register(sock)
        print(f"{args.pin_dir}: registered listener {_address(sock)} (socket cookie {cookie})")
        if not args.spread:
            return 0
        members = _lane_members(args.pid, sock)
        if not members:
            state.register_lanes([])
            state.register_group(None)
            print(f"{args.pin_dir}: no worker group: every connection goes to the listener")
            return 0
        try:
            state.register_lanes(members)  # first: the lanes take over from the group
            group = state.register_group(members[0])  # (lanes an older program lacks)
            where = _address(members[0])
        finally:
            for member in members:
                member.close()
        lanes = f"{len(members)} lanes (an accept queue per app, up to {LANES} apps)" \
            if len(members) > 1 else "one lane"
        print(f"{args.pin_dir}: connections spread over the workers' groups in {lanes}, "
              f"the first {where} (socket cookie {group})")
    return 0


def cmd_unspread(args) -> int:
    """Clear the workers' group: every new connection goes to the listener (idempotent).
    The unit runs it before stopping the proxy, whose group is about to close."""
    with PinnedState(args.pin_dir) as state:
        had = state.group_cookie() is not None or bool(state.lane_cookies())
        if LANES_MAP in state.fds:
            state.register_lanes([])
        state.register_group(None)
    print(f"{args.pin_dir}: {'worker group cleared' if had else 'no worker group'}: "
          "every connection goes to the listener")
    return 0


def cmd_status(args) -> int:
    with PinnedState(args.pin_dir, readonly=True) as state:
        status = state.status()
    status["link"]["this_netns"] = status["link"]["netns_ino"] == os.stat(
        "/proc/self/ns/net").st_ino
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    ports = sorted(status["ports"])
    cookie = status["listener_cookie"]
    print(f"state:    {status['pin_dir']}")
    print(f"program:  id {status['program']['id']} tag {status['program']['tag']}")
    here = os.stat("/proc/self/ns/net").st_ino
    there = status["link"]["netns_ino"]
    elsewhere = "" if status["link"]["this_netns"] else (f" (ANOTHER network namespace: this command runs "
                                          f"in {here}; the program steers there, not here)")
    print(f"link:     id {status['link']['id']} netns inode {there}{elsewhere}")
    print(f"listener: {'socket cookie %d' % cookie if cookie is not None else 'NONE (connections to our ports are refused)'}")
    group = status["group_cookie"]
    print(f"group:    {'socket cookie %d (spread over the workers)' % group if group is not None else 'none (the listener takes every connection)'}")
    lanes = status["lane_cookies"]
    print(f"lanes:    {len(set(lanes))} groups in {len(lanes)} of {LANES} lanes (an accept queue per app)" if lanes else "lanes:    none")
    print(f"ports:    {len(ports)}: {' '.join(map(str, ports[:40]))}{' ...' if len(ports) > 40 else ''}")
    print("counters: " + ", ".join(f"{k} {v}" for k, v in status["counters"].items()))
    return 0


METRICS = (  # counter name in the map -> (metric, help)
    ("steered", "flyproxy_bpf_steered_total", "Connections sk_lookup assigned to the proxy's listener"),
    ("no_listener", "flyproxy_bpf_no_listener_total", "Connections to our ports with no listener registered"),
    ("assign_failed", "flyproxy_bpf_assign_failed_total", "Connections bpf_sk_assign refused"),
)


def prometheus_text(status: dict) -> str:
    lines = []
    for key, name, help_text in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter",
                  f"{name} {status['counters'][key]}"]
    lines += ["# HELP flyproxy_bpf_ports Ports in the steering map", "# TYPE flyproxy_bpf_ports gauge",
              f"flyproxy_bpf_ports {len(status['ports'])}",
              "# HELP flyproxy_bpf_listener_registered 1 if a listener is in the sockmap",
              "# TYPE flyproxy_bpf_listener_registered gauge",
              f"flyproxy_bpf_listener_registered {int(status['listener_cookie'] is not None)}"]
    return "\n".join(lines) + "\n"


def cmd_metrics(args) -> int:
    """The steering counters in Prometheus text format, for node_exporter's textfile collector
    (the proxy itself cannot read BPF maps: it is unprivileged)."""
    with PinnedState(args.pin_dir, readonly=True) as state:
        text = prometheus_text(state.status())
    if not args.textfile:
        print(text, end="")
        return 0
    path = Path(args.textfile)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)  # atomic: the collector never reads half a file
    return 0


def cmd_unload(args) -> int:
    removed = unload(args.pin_dir)
    print(f"{args.pin_dir}: " + (f"unpinned {', '.join(removed)}" if removed else "nothing loaded"))
    return 0
