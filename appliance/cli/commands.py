"""The commands besides ``bpf``: each turns parsed arguments into a call and prints the
outcome (one clear line per problem a user can cause, exit 1)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from .. import config as configmod
from ..logs import count
from ..settings import ServeConfig, default_config, parse_hostport


def _load_or_exit(path: str) -> configmod.Config:
    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None


def check(args: argparse.Namespace) -> int:
    """``check [FILE]``, ``check -c FILE``; ``-`` reads standard input. Problems and warnings
    go to stderr, one line each; the summary to stdout."""
    if args.file and args.config and args.file != args.config:
        print(f"flyproxy check: two files given ({args.file}, {args.config}); check one at a time",
              file=sys.stderr)
        return 2
    path = args.file or args.config or default_config()
    try:
        if path == "-":
            config = configmod.loads(sys.stdin.buffer.read(configmod.MAX_BYTES + 1), "<stdin>")
        else:
            config = configmod.load(path)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(configmod.in_file(config.source, warning, "warning"), file=sys.stderr)
    print(f"{config.source}: OK: {config.summary()}")
    for app in config.apps:
        if app.options():
            print(f"  {app.name}: {app.options()}")
    return 0


def serve(args: argparse.Namespace) -> int:
    from ..service import launch

    settings = ServeConfig.from_args(args)
    try:
        if settings.worker_channel is not None:  # a worker, started by a supervisor
            return launch.serve_worker(settings)
        if settings.resume_fd is not None:  # a supervisor, re-executed by an upgrade
            return launch.resume(settings)
        return launch.serve(_load_or_exit(settings.config), settings)
    except launch.LaunchError as e:
        print(f"flyproxy serve: {e}", file=sys.stderr)
        return 1


def reload(args: argparse.Namespace) -> int:
    """Validate, have the running proxy apply the config, then sync the BPF port map.

    The order keeps every kept port working and makes an added port work as soon as
    this returns: the proxy learns new ports before BPF steers them to it, and a
    removed port stops being steered only after the proxy has dropped it.
    """
    from ..service import control

    try:  # the file the running proxy serves: what it re-reads, what is validated here
        running = control.request(args.control, "status")
        served, served_mode = running.get("config"), running.get("mode")
    except control.ControlError as e:
        print(f"flyproxy reload: {e}", file=sys.stderr)
        return 1
    if args.config is not None and (not served or os.path.realpath(args.config)
                                    != os.path.realpath(served)):
        print(f"flyproxy reload: the proxy serves {served}, not {args.config}; a reload "
              f"re-reads the proxy's own file (to serve another file, change its -c or "
              f"FLYPROXY_CONFIG and restart it)", file=sys.stderr)
        return 2
    args.config = served or default_config()
    config = _load_or_exit(args.config)
    try:
        reply = control.request(args.control,
                                "reload new-workers" if args.new_workers else "reload")
    except control.ControlError as e:
        print(f"flyproxy reload: {e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"flyproxy reload: {reply.get('error')}", file=sys.stderr)
        return 1
    if reply.get("digest") != config.digest:
        print(f"flyproxy reload: {args.config} changed while reloading; run reload again",
              file=sys.stderr)
        return 1
    print(reply["message"])
    if args.pin_dir and not os.path.exists(os.path.join(args.pin_dir, "link")):
        if served_mode == "handed-in":  # (per-port mode binds its ports: nothing to sync)
            print(f"flyproxy reload: no BPF steering state at {args.pin_dir} (not loaded, or "
                  "loaded with another --pin-dir): the port map was not synced, so ports "
                  "this reload added are not steered to the proxy", file=sys.stderr)
    elif args.pin_dir:
        import types

        from ..bpf.state import PinnedState, SteeringError
        from .bpf import _locked
        try:  # (one flyproxy bpf command at a time per pin dir: this sync is one)
            with _locked(types.SimpleNamespace(func="sync", pin_dir=args.pin_dir)), \
                    PinnedState(args.pin_dir) as state:
                changed, removed = state.sync(config)
        except (SteeringError, OSError) as e:
            print(f"flyproxy reload: the proxy has the new config but the BPF port map "
                  f"was not synced: {e}", file=sys.stderr)
            return 1
        print(f"{args.pin_dir}: port map synced: {len(changed)} added or changed, "
              f"{len(removed)} removed")
    return 0


def status(args: argparse.Namespace) -> int:
    from ..service import control

    try:
        reply = control.request(args.control, "status")
    except control.ControlError as e:
        print(f"flyproxy status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(f"config {reply['config']} (generation {reply['generation']}, {reply['mode']} mode, "
          f"{count(reply['active'], 'active connection')})")
    on_disk = _digest_of(reply["config"])
    if on_disk is not None and on_disk != reply["digest"]:
        print(f"  {reply['config']} on disk differs from the config in force: "
              "`flyproxy reload` applies it")
    if reply.get("generations"):
        print(f"version {reply['version']} (code {reply['code']}), worker generation "
              f"{reply['generations'][-1]['generation']}")
    if "workers" in reply:
        print(f"{count(len(reply['workers']), 'worker')} "
              f"({count(reply['restarts'], 'restart')}): " + ", ".join(map(_worker,
                                                                          reply["workers"])))
        for g in reply.get("generations", [])[:-1]:  # older generations, draining
            since = time.strftime("%H:%M:%S", time.localtime(g["draining_since"]))
            print(f"  generation {g['generation']} (version {g['version']}, code {g['code']}): "
                  f"draining since {since}, {count(g['active'], 'connection')}, pids "
                  + " ".join(map(str, g["pids"])))
    elif reply.get("fds"):
        print(_fds(reply["fds"]))
    rows = [("APP", "PORTS", "ACTIVE", "TARGET", "STATE")]
    for a in reply["apps"]:
        limit = f"/{a['max_connections']}" if a.get("max_connections") else ""
        for i, t in enumerate(a["targets"]):
            first = i == 0
            rows.append((a["name"] if first else "", " ".join(map(str, a["ports"])) if first else "",
                         f"{a['active']}{limit}" if first else "", t["target"],
                         t.get("text", t["health"])))
    _print_table(rows)
    if reply.get("names"):
        print()
        rows = [("NAME", "STATE", "ADDRESSES", "AGE", "TTL", "SOURCE", "LAST ERROR")]
        for n in reply["names"]:
            age = "-" if n["age_s"] is None else f"{n['age_s']:g}s"
            rows.append((n["name"], n["state"], " ".join(n["addresses"]) or "-", age,
                         f"{n['ttl_s']:g}s", n["source"], n["error"] or "-"))
        _print_table(rows)
    return 0


def _digest_of(path: str) -> str | None:
    """The sha256 of the file as it is now (None if it cannot be read here)."""
    import hashlib
    try:  # (regular files only, bounded: never a FIFO that would hang the command)
        return hashlib.sha256(configmod.read(path)).hexdigest()
    except (configmod.ConfigError, OSError):
        return None


def _worker(w: dict) -> str:
    if w["ready"]:
        return f"pid {w['pid']} ({w['active']} active, {_fds(w.get('fds'))})"
    if w.get("failing"):
        retry = f", next try in {w['retry_in_s']:g}s" if w.get("retry_in_s") is not None else ""
        return f"worker {w['index']} FAILING ({w['failing']}{retry})"
    return f"pid {w['pid']} (starting)"


def _fds(fds: dict | None) -> str:
    return f"{fds['open']:,} of {fds['limit']:,} fds" if fds else "fds ?"


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def echo(args: argparse.Namespace) -> int:
    from .. import echo as echomod

    try:
        addresses = [(h or "127.0.0.1", p) for h, p in map(parse_hostport, args.listen)]
    except ValueError as e:
        print(f"flyproxy echo: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(echomod.serve(addresses))
    except KeyboardInterrupt:
        pass
    return 0


def demo(args: argparse.Namespace) -> int:
    from .. import demo as demomod
    from ..dataplane.listeners import ListenerError
    from ..dataplane.loop import run

    try:
        return run(demomod.run(args.workdir, args.host))
    except OSError as e:
        print(f"flyproxy demo: {e} (is another demo or proxy using the ports?)", file=sys.stderr)
        return 1
    except ListenerError as e:
        print(f"flyproxy demo: {e}", file=sys.stderr)
        return 1
