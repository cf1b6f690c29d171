"""Every option of ``flyproxy serve``, in one place: its default, its environment variable,
its command-line form and its help.

:class:`ServeConfig` is the one object a running proxy reads them from: the process's
(config file, control socket, metrics address, --watch, log level, handed-in sockets),
the data plane's, the resolver's, the supervisor's. The command line is built from it
(:func:`add_arguments`, which also reads each option's environment variable: the one place
argv and environment become options), parsed back into it (:meth:`ServeConfig.from_args`),
and a worker, or a supervisor re-executed by an upgrade, is started with exactly these
options as its arguments (:meth:`ServeConfig.to_argv`): a new option is one field here,
and no place can forget to pass it on.

The dataclass's defaults are a proxy built in code (no control socket, no metrics: the
demo, tests); the command line's defaults are the same but for the environment and
``--control``, which has a socket by default (:func:`default_control`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Callable

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_CONFIG = "/etc/flyproxy/config.json"  # the unit's
CONTROL_DEFAULT_TEXT = ("$FLYPROXY_CONTROL, else /run/flyproxy/control.sock as root, else "
                        "$XDG_RUNTIME_DIR/flyproxy.sock")


def default_config() -> str:
    """The config file every command reads unless told: $FLYPROXY_CONFIG, else the unit's."""
    return os.environ.get("FLYPROXY_CONFIG") or DEFAULT_CONFIG


def default_control() -> str:
    """Where ``serve`` opens its control socket and every client command looks for it:
    $FLYPROXY_CONTROL; else /run/flyproxy/control.sock for root (the unit's); else
    $XDG_RUNTIME_DIR/flyproxy.sock; else /tmp/flyproxy-UID.sock."""
    if os.environ.get("FLYPROXY_CONTROL"):
        return os.environ["FLYPROXY_CONTROL"]
    if os.geteuid() == 0:
        return "/run/flyproxy/control.sock"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "flyproxy.sock")
    return f"/tmp/flyproxy-{os.geteuid()}.sock"


def parse_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` -> (host or "", port); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def worker_count(text: str) -> int:
    """``--workers``: a number, or ``auto`` for the CPUs this process may run on."""
    if text == "auto":
        return len(os.sched_getaffinity(0))
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text}: expected 1 to 64 or auto")
    return int(text)


def positive_int(text: str) -> int:
    """A whole number, 1 or more (``--conn-log-sample``)."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a whole number, 1 or more")
    return int(text)


def path_or_none(text: str) -> str | None:
    """``--control``, ``--metrics``: '' is none (so an argv can turn off a default)."""
    return text or None


def option(default: Any, flag: str, help: str, *, metavar: str | None = None,
           env: str | None = None, type: Callable | None = None,
           choices: tuple | None = None, short: str | None = None,
           cli_default: Callable[[], Any] | None = None, action: str | None = None,
           scope: str = "serve") -> Any:
    """A ServeConfig field: ``default``, set with ``flag`` (or ``short``), or environment
    variable ``env``. ``cli_default``: the command line's default when ``env`` is not set
    (computed when the parser is built). ``action``: ``store_true`` (a switch) or
    ``append`` (repeatable: a tuple). ``scope``: ``serve`` (an option of ``serve``),
    ``global`` (``flyproxy --log-level``: before any command, or after it) or ``internal``
    (set by a supervisor for its workers, undocumented)."""
    return dataclasses.field(default=default, metadata={
        "flag": flag, "short": short, "help": help, "metavar": metavar, "env": env,
        "type": type or builtin_type(default), "choices": choices,
        "cli_default": cli_default, "action": action, "scope": scope})


def builtin_type(default: Any) -> Callable:
    return type(default) if default is not None else str


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    # -- the process ----------------------------------------------------------------------
    config: str = option(DEFAULT_CONFIG, "--config", "config file (default "
                         "$FLYPROXY_CONFIG, else " + DEFAULT_CONFIG + ")", short="-c",
                         env="FLYPROXY_CONFIG")
    fd: tuple[int, ...] = option((), "--fd", "serve on this inherited listening socket "
                                 "instead of binding ports (repeatable; systemd's LISTEN_FDS "
                                 "are used automatically)", type=int, action="append")
    listen: str | None = option(None, "--listen", "handed-in mode on a socket bound here: "
                                "route every connection steered to it by the port the client "
                                "dialled (use with flyproxy bpf)", metavar="HOST:PORT")
    control: str | None = option(None, "--control", "open the control socket here (default "
                                 f"{CONTROL_DEFAULT_TEXT}; '' for none)", metavar="PATH",
                                 env="FLYPROXY_CONTROL", type=path_or_none,
                                 cli_default=default_control)
    metrics: str | None = option(None, "--metrics", "serve Prometheus metrics and the status "
                                 "page here (default: off; the unit uses 127.0.0.1:9464)",
                                 metavar="HOST:PORT", env="FLYPROXY_METRICS",
                                 type=path_or_none)
    watch: bool = option(False, "--watch", "reload when the config file changes (inotify on "
                         "its directory; default: off, reload on SIGHUP or `flyproxy "
                         "reload`, as the unit does)", action="store_true")
    log_level: str = option("info", "--log-level", "log messages at this level and above "
                            "(default info, or $FLYPROXY_LOG_LEVEL); also after the command",
                            env="FLYPROXY_LOG_LEVEL", choices=LOG_LEVELS, type=str.lower,
                            scope="global")
    # -- where and how --------------------------------------------------------------------
    host: str | None = option(None, "--host", "address to bind the configured ports on "
                              "(default: every address, IPv4 and IPv6)")
    workers: int = option(1, "--workers", "worker processes sharing the listeners: a number, "
                          "or auto for one per CPU (default 1: a single process; the unit "
                          "uses auto)", metavar="N", env="FLYPROXY_WORKERS", type=worker_count)
    supervisor: str = option("auto", "--supervisor", "run a supervisor even with one worker "
                             "(yes: upgrades by reload keep connections; the unit's "
                             "choice), or only with more than one (auto, the default)",
                             env="FLYPROXY_SUPERVISOR", choices=("auto", "yes"))
    drain_time_s: float = option(3600.0, "--drain-time", "after an upgrade, the old "
                                 "workers' connections may finish for this long, then the "
                                 "rest are closed (default 3600)", metavar="SECONDS")
    loop: str = option("auto", "--loop", "event loop: asyncio's waiting on the relay's epoll "
                       "set (auto, asyncio: the default), or uvloop (python3-uvloop) around it",
                       env="FLYPROXY_LOOP", choices=("auto", "uvloop", "asyncio"))
    # -- connections ----------------------------------------------------------------------
    connect_timeout_s: float = option(3.0, "--connect-timeout", "per-target connect timeout "
                                      "(default 3)", metavar="SECONDS")
    idle_timeout_s: float = option(3600.0, "--idle-timeout", "close a connection that moved "
                                   "no byte for this long (default 3600; 0: never)",
                                   metavar="SECONDS")
    eject_s: float = option(10.0, "--eject", "try a target whose connect just failed last, "
                            "for this long (default 10)", metavar="SECONDS")
    grace_period_s: float = option(30.0, "--grace-period", "how long open connections may "
                                   "finish at shutdown (default 30)", metavar="SECONDS")
    splice_after: int = option(1 << 20, "--splice-after", "once one direction of a "
                               "connection has carried this many bytes, move it with splice() "
                               "(kernel-side copy, a pipe per direction); 0: never (default "
                               "1 MiB)", metavar="BYTES")
    # TCP keepalive, both sides: a peer that vanishes without FIN or RST is found in
    # idle + interval * probes seconds
    keepalive_idle_s: float = option(60.0, "--keepalive-idle", "TCP keepalive on both sides "
                                     "of a connection: first probe after this long without "
                                     "traffic (default 60; 0: off)", metavar="SECONDS")
    keepalive_interval_s: float = option(15.0, "--keepalive-interval", "... then a probe "
                                         "every this long (default 15)", metavar="SECONDS")
    keepalive_probes: int = option(4, "--keepalive-probes", "... and this many unanswered "
                                   "probes reset it (default 4)", metavar="N")
    conn_log_level: str = option("info", "--conn-log-level", "level of the access log: "
                                 "a line per connection as it ends, and one every "
                                 "--conn-log-interval while it lasts (default info; off: "
                                 "none)", env="FLYPROXY_CONN_LOG_LEVEL", type=str.lower,
                                 choices=("debug", "info", "warning", "off"))
    conn_log_interval_s: float = option(300.0, "--conn-log-interval", "a connection open "
                                        "this long gets an access log line (bytes so far), "
                                        "and another every this long (default 300; 0: "
                                        "only when it ends)", metavar="SECONDS",
                                        env="FLYPROXY_CONN_LOG_INTERVAL")
    conn_log_sample: int = option(1, "--conn-log-sample", "write the closing line of 1 in N "
                                  "connections that ended cleanly on their first target "
                                  "(default 1: every one); one that ended otherwise (reset, "
                                  "timeout, error, a retry) always gets its line",
                                  metavar="N", env="FLYPROXY_CONN_LOG_SAMPLE",
                                  type=positive_int)
    # -- host-name targets (dataplane/resolver.py) ---------------------------------------
    dns_min_ttl_s: float = option(1.0, "--dns-min-ttl", "keep a host name's answer at least "
                                  "this long (default 1)", metavar="SECONDS")
    dns_max_ttl_s: float = option(300.0, "--dns-max-ttl", "... and at most this long, "
                                  "whatever its TTL (default 300)", metavar="SECONDS")
    dns_negative_ttl_s: float = option(10.0, "--dns-negative-ttl", "a name with no address "
                                       "(NXDOMAIN) is down this long before it is asked "
                                       "again (default 10)", metavar="SECONDS")
    dns_stale_s: float = option(300.0, "--dns-stale", "while the resolver fails, keep using "
                                "a name's last addresses this long past their TTL (default "
                                "300)", metavar="SECONDS")
    dns_timeout_s: float = option(2.0, "--dns-timeout", "DNS query timeout per try, doubling "
                                  "on the second (default 2)", metavar="SECONDS")
    dns_tries: int = 2  # c-ares tries per query (not an option)
    # -- set by a supervisor for its workers (supervisor.py, workers.py), and for the new
    # image of itself an upgrade executes (reexec.py) -------------------------------------
    worker_channel: int | None = option(None, "--worker-channel", "", type=int,
                                        scope="internal")
    config_fd: int | None = option(None, "--config-fd", "", type=int, scope="internal")
    generation: int = option(1, "--generation", "", scope="internal")
    collect_metrics: bool = option(False, "--collect-metrics", "", action="store_true",
                                   scope="internal")
    resume_fd: int | None = option(None, "--resume-fd", "", type=int, scope="internal")
    # FD:COLUMN: the host's connection limits' table (dataplane/limits.py) and the worker's
    # column in it
    limits: str | None = option(None, "--limits", "", scope="internal")

    @property
    def conn_log_levelno(self) -> int | None:
        """The access log's level, None when it is off."""
        if self.conn_log_level == "off":
            return None
        return logging.getLevelName(self.conn_log_level.upper())

    @classmethod
    def options(cls, *scopes: str) -> list[dataclasses.Field]:
        """The fields that are options (of these scopes; default: all)."""
        return [f for f in dataclasses.fields(cls) if "flag" in f.metadata
                and (not scopes or f.metadata["scope"] in scopes)]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        values = {}
        for f in cls.options():
            value = getattr(args, f.name)
            values[f.name] = tuple(value or ()) if f.metadata["action"] == "append" else value
        return cls(**values)

    def to_argv(self) -> list[str]:
        """These options as ``serve`` arguments, every one explicitly (so neither the
        environment nor a default of other code can change them): a worker's, or a
        re-executed supervisor's."""
        argv = []
        for f in self.options():
            meta, value = f.metadata, getattr(self, f.name)
            if meta["action"] == "append":
                argv += [a for item in value for a in (meta["flag"], str(item))]
            elif meta["action"] == "store_true":
                argv += [meta["flag"]] if value else []
            elif value is not None:
                argv += [meta["flag"], str(value)]
            elif meta["env"] or meta["cli_default"]:  # none, against a default that is not
                argv += [meta["flag"], ""]
        return argv


# The name dataplane/proxy.py imports it by (being changed on another branch: rename there
# once it lands)
Settings = ServeConfig


def add_arguments(parser: argparse.ArgumentParser, *scopes: str) -> None:
    """Every ServeConfig option of ``scopes`` (default: ``serve``'s own and the internal
    ones) as an argument of ``parser`` (dest: the field's name). Its default: its
    environment variable's value if that is set, else its command-line default
    (``cli_default``), else the field's."""
    for f in ServeConfig.options(*(scopes or ("serve", "internal"))):
        add_argument(parser, f)


def add_argument(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    meta = f.metadata
    default = f.default
    if meta["env"] and os.environ.get(meta["env"]):
        text = os.environ[meta["env"]]
        try:
            default = meta["type"](text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            parser.error(f"${meta['env']}={text!r}: {e}")
        if meta["choices"] and default not in meta["choices"]:
            parser.error(f"${meta['env']}={text!r}: expected one of "
                         + ", ".join(meta["choices"]))
    elif meta["cli_default"] is not None:
        default = meta["cli_default"]()
    flags = [meta["short"], meta["flag"]] if meta["short"] else [meta["flag"]]
    help = argparse.SUPPRESS if meta["scope"] == "internal" else meta["help"]
    if meta["action"] == "store_true":
        parser.add_argument(*flags, dest=f.name, action="store_true", default=default,
                            help=help)
    elif meta["action"] == "append":  # (default None: argparse appends to a copy of it)
        parser.add_argument(*flags, dest=f.name, action="append", type=meta["type"],
                            metavar=meta["metavar"], help=help)
    else:
        parser.add_argument(*flags, dest=f.name, default=default, type=meta["type"],
                            choices=meta["choices"], metavar=meta["metavar"], help=help)
