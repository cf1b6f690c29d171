"""The ``flyproxy`` command line.

Nouns that only read (``check``, ``bpf status``) never change state; verbs do.
Errors a user can cause print one clear line per problem and exit 1; tracebacks
are for bugs. The ``bpf`` commands are imported lazily: only they touch bcc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from . import __version__
from . import config as configmod
from . import listeners

DEFAULT_CONFIG = os.environ.get("FLYPROXY_CONFIG", "/etc/flyproxy/config.json")
DEFAULT_CONTROL = os.environ.get("FLYPROXY_CONTROL", "/run/flyproxy/control.sock")


def _setup_logging(level: str) -> None:
    if os.environ.get("JOURNAL_STREAM") and os.environ.get("INVOCATION_ID"):
        try:
            from systemd.journal import JournalHandler
            handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="flyproxy")
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:  # pragma: no cover
            handler = logging.StreamHandler()
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def _load_or_exit(path: str) -> configmod.Config:
    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check(args: argparse.Namespace) -> int:
    config = _load_or_exit(args.config)
    print(f"{args.config}: OK: {config.summary()}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import control
    from . import metrics as metricsmod
    from . import supervisor as supervisormod
    from . import workers as workersmod
    from .proxy import Options
    from .server import Server

    if args.config_fd is not None:  # a worker: the config in force, from its supervisor
        with os.fdopen(args.config_fd, "rb") as f:
            try:
                config = configmod.loads(f.read(), args.config)
            except configmod.ConfigError as e:
                print(e, file=sys.stderr)
                return 1
    else:
        config = _load_or_exit(args.config)
    try:
        n_workers = workersmod.count(args.workers)
    except ValueError as e:
        print(f"flyproxy serve: {e}", file=sys.stderr)
        return 1
    try:
        if args.listen:
            host, port = listeners.parse_hostport(args.listen)
            sockets = [listeners.bind(port, host or None)]
        else:
            fds = args.fd or listeners.systemd_fds()
            sockets = [listeners.from_fd(fd) for fd in fds]
    except (listeners.ListenerError, ValueError) as e:
        print(f"flyproxy serve: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"flyproxy serve: cannot listen on {args.listen}: {e.strerror}", file=sys.stderr)
        return 1

    if n_workers > 1 and args.worker_channel is None:
        worker_argv = ["--log-level", args.log_level, "serve", "-c", args.config,
                       "--loop", args.loop, "--workers", str(n_workers),
                       "--connect-timeout", str(args.connect_timeout),
                       "--grace-period", str(args.grace_period),
                       "--idle-timeout", str(args.idle_timeout), "--eject", str(args.eject),
                       "--splice-after", str(args.splice_after),
                       "--conn-log-level", args.conn_log_level,
                       "--dns-min-ttl", str(args.dns_min_ttl), "--dns-max-ttl", str(args.dns_max_ttl),
                       "--dns-negative-ttl", str(args.dns_negative_ttl),
                       "--dns-stale", str(args.dns_stale), "--dns-timeout", str(args.dns_timeout),
                       "--keepalive-idle", str(args.keepalive_idle),
                       "--keepalive-interval", str(args.keepalive_interval),
                       "--keepalive-probes", str(args.keepalive_probes)]
        if args.host:
            worker_argv += ["--host", args.host]
        if args.metrics:
            worker_argv.append("--collect-metrics")
        supervisor = supervisormod.Supervisor(
            args.config, config, n_workers, worker_argv, sockets, control_path=args.control,
            metrics_address=args.metrics, grace_s=args.grace_period)
        try:
            supervisor.serve_metrics()
        except (OSError, ValueError) as e:
            print(f"flyproxy serve: --metrics {args.metrics}: {e}", file=sys.stderr)
            return 1
        try:
            supervisor.make_group()
        except OSError as e:
            print(f"flyproxy serve: cannot make the workers' listening group: {e.strerror}",
                  file=sys.stderr)
            return 1
        try:
            return asyncio.run(supervisor.serve())
        except (OSError, control.ControlError) as e:  # the control socket or the metrics port
            print(f"flyproxy serve: {e}", file=sys.stderr)
            return 1

    from .resolver import DnsOptions
    dns = DnsOptions(min_ttl_s=args.dns_min_ttl, max_ttl_s=max(args.dns_max_ttl, args.dns_min_ttl),
                     negative_ttl_s=args.dns_negative_ttl, stale_s=args.dns_stale,
                     timeout_s=args.dns_timeout)
    options = Options(connect_timeout_s=args.connect_timeout, idle_timeout_s=args.idle_timeout,
                      eject_s=args.eject, workers=n_workers, splice_after=args.splice_after,
                      conn_log_level=logging.getLevelName(args.conn_log_level.upper()), dns=dns,
                      keepalive_idle_s=args.keepalive_idle,
                      keepalive_interval_s=args.keepalive_interval,
                      keepalive_probes=args.keepalive_probes)
    channel = None
    if args.worker_channel is not None:  # a worker: counts go to the supervisor, which serves them
        channel = listeners.channel_from_fd(args.worker_channel)
        metrics = metricsmod.Metrics() if args.collect_metrics else metricsmod.NullMetrics()
    else:
        try:
            metrics = metricsmod.create(args.metrics)
        except (OSError, ValueError) as e:
            print(f"flyproxy serve: --metrics {args.metrics}: {e}", file=sys.stderr)
            return 1

    async def main() -> int:
        server = Server(args.config, config, host=args.host, sockets=sockets, options=options,
                        metrics=metrics, grace_s=args.grace_period, control_path=args.control,
                        channel=channel)
        server.proxy.generation = args.generation
        return await server.serve()

    try:
        return _run(main(), args.loop)
    except (listeners.ListenerError, control.ControlError) as e:
        print(f"flyproxy serve: {e}", file=sys.stderr)
        return 1


def _run(coro, loop: str = "auto"):
    """asyncio.run on the chosen event loop: asyncio's own, waiting on the relay's epoll
    set (auto, the default: see engine.EngineSelector), or uvloop (python3-uvloop)."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit("flyproxy: --loop uvloop: uvloop is not installed "
                             "(Debian package python3-uvloop)") from None
        factory = uvloop.new_event_loop
    else:
        from .engine import EngineSelector

        def factory():
            return asyncio.SelectorEventLoop(EngineSelector())
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate, have the running proxy apply the config, then sync the BPF port map.

    The order keeps every kept port working and makes an added port work as soon as
    this returns: the proxy learns new ports before BPF steers them to it, and a
    removed port stops being steered only after the proxy has dropped it.
    """
    from . import control

    config = _load_or_exit(args.config)
    try:
        reply = control.request(args.control, "reload")
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
    if args.pin_dir and os.path.exists(os.path.join(args.pin_dir, "link")):
        from .bpf.state import PinnedState, SteeringError
        try:
            with PinnedState(args.pin_dir) as state:
                changed, removed = state.sync(config)
        except (SteeringError, OSError) as e:
            print(f"flyproxy reload: the proxy has the new config but the BPF port map "
                  f"was not synced: {e}", file=sys.stderr)
            return 1
        print(f"{args.pin_dir}: port map synced: {len(changed)} added or changed, "
              f"{len(removed)} removed")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import control

    try:
        reply = control.request(args.control, "status")
    except control.ControlError as e:
        print(f"flyproxy status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    print(f"config {reply['config']} (generation {reply['generation']}, {reply['mode']} mode, "
          f"{reply['active']} active connections)")
    if "workers" in reply:
        print(f"{len(reply['workers'])} workers ({reply['restarts']} restarts): " + ", ".join(
            f"pid {w['pid']} ({w['active']} active)" if w["ready"] else f"pid {w['pid']} (starting)"
            for w in reply["workers"]))
    rows = [("APP", "PORTS", "ACTIVE", "TARGET", "HEALTH")]
    for a in reply["apps"]:
        limit = f"/{a['max_connections']}" if a.get("max_connections") else ""
        for i, t in enumerate(a["targets"]):
            first = i == 0
            rows.append((a["name"] if first else "", " ".join(map(str, a["ports"])) if first else "",
                         f"{a['active']}{limit}" if first else "", t["target"], t["health"]))
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


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def cmd_echo(args: argparse.Namespace) -> int:
    from . import echo

    try:
        addresses = [(h or "127.0.0.1", p) for h, p in map(listeners.parse_hostport, args.listen)]
    except ValueError as e:
        print(f"flyproxy echo: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(echo.serve(addresses))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    try:
        return _run(demo.run(args.workdir, args.host))
    except OSError as e:
        print(f"flyproxy demo: {e} (is another demo or proxy using the ports?)", file=sys.stderr)
        return 1
    except listeners.ListenerError as e:
        print(f"flyproxy demo: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flyproxy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flyproxy {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("FLYPROXY_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                       help=f"config file (default {DEFAULT_CONFIG})")

    def control_arg(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONTROL) -> None:
        p.add_argument("--control", default=default, metavar="PATH",
                       help=f"control socket (default {default})")

    p = sub.add_parser("check", help="validate a config file")
    config_arg(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("serve", help="run the proxy")
    config_arg(p)
    p.add_argument("--host", help="address to bind the configured ports on "
                                  "(default: every address, IPv4 and IPv6)")
    p.add_argument("--fd", type=int, action="append",
                   help="serve on this inherited listening socket instead of binding ports "
                        "(repeatable; systemd's LISTEN_FDS are used automatically)")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="single-listener mode: bind one socket here and route every connection "
                        "steered to it by the port the client dialled (use with flyproxy bpf)")
    control_arg(p, None)
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"],
                   default=os.environ.get("FLYPROXY_LOOP", "auto"),
                   help="event loop: asyncio's waiting on the relay's epoll set (auto, "
                        "asyncio: the default), or uvloop (python3-uvloop) around it")
    p.add_argument("--connect-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="per-target connect timeout (default 3)")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                   help="how long open connections may finish at shutdown (default 30)")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="close a connection that moved no byte for this long (default 3600; 0: never)")
    p.add_argument("--eject", type=float, default=10.0, metavar="SECONDS",
                   help="try a target whose connect just failed last, for this long (default 10)")
    p.add_argument("--conn-log-level", default=os.environ.get("FLYPROXY_CONN_LOG_LEVEL", "debug"),
                   choices=["debug", "info", "warning"],
                   help="level of the one log line per connection (default debug)")
    p.add_argument("--metrics", metavar="HOST:PORT", default=os.environ.get("FLYPROXY_METRICS"),
                   help="serve Prometheus metrics here (default: off; the unit uses 127.0.0.1:9464)")
    p.add_argument("--splice-after", type=int, default=1 << 20, metavar="BYTES",
                   help="once one direction of a connection has carried this many bytes, move "
                        "it with splice() (kernel-side copy, a pipe per direction); 0: never "
                        "(default 1 MiB)")
    p.add_argument("--dns-min-ttl", type=float, default=1.0, metavar="SECONDS",
                   help="keep a host name's answer at least this long (default 1)")
    p.add_argument("--dns-max-ttl", type=float, default=300.0, metavar="SECONDS",
                   help="... and at most this long, whatever its TTL (default 300)")
    p.add_argument("--dns-negative-ttl", type=float, default=10.0, metavar="SECONDS",
                   help="a name with no address (NXDOMAIN) is down this long before it is "
                        "asked again (default 10)")
    p.add_argument("--dns-stale", type=float, default=300.0, metavar="SECONDS",
                   help="while the resolver fails, keep using a name's last addresses this "
                        "long past their TTL (default 300)")
    p.add_argument("--dns-timeout", type=float, default=2.0, metavar="SECONDS",
                   help="DNS query timeout per try, doubling on the second (default 2)")
    p.add_argument("--keepalive-idle", type=float, default=60.0, metavar="SECONDS",
                   help="TCP keepalive on both sides of a connection: first probe after this "
                        "long without traffic (default 60; 0: off)")
    p.add_argument("--keepalive-interval", type=float, default=15.0, metavar="SECONDS",
                   help="... then a probe every this long (default 15)")
    p.add_argument("--keepalive-probes", type=int, default=4, metavar="N",
                   help="... and this many unanswered probes reset it (default 4)")
    p.add_argument("--workers", default=os.environ.get("FLYPROXY_WORKERS", "1"), metavar="N",
                   help="worker processes sharing the listeners: a number, or auto for one per "
                        "CPU (default 1: a single process; the unit uses auto)")
    # set by a supervisor for its workers (see appliance/supervisor.py)
    p.add_argument("--worker-channel", type=int, help=argparse.SUPPRESS)
    p.add_argument("--collect-metrics", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--generation", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--config-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("reload", help="apply the config file to the running proxy, synchronously")
    config_arg(p)
    control_arg(p)
    p.add_argument("--pin-dir", default="/sys/fs/bpf/flyproxy",
                   help="BPF state to sync after the proxy reloaded, if loaded "
                        "(default /sys/fs/bpf/flyproxy; '' to skip)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("status", help="show the running proxy (read-only)")
    control_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("echo", help="run a TCP echo backend")
    p.add_argument("--listen", action="append", required=True, metavar="HOST:PORT")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("demo", help="the challenge's apps, served by local echo targets")
    p.add_argument("--workdir", help="where to write the demo config (default: a temp dir)")
    p.add_argument("--host", default="127.0.0.1", help="address the proxy binds (default 127.0.0.1)")
    p.set_defaults(func=cmd_demo)

    from .bpf.cli import add_commands
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "bpf":
        from .bpf.cli import run
        return run(args)
    return args.func(args)
