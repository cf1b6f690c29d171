"""Every option of ``flyproxy serve``, in one place: its default, its environment variable,
its command-line form and its help.

:class:`Settings` is the one object the running proxy reads them from (the data plane, the
resolver, the server, the supervisor). The command line is built from it
(:func:`add_arguments`), parsed back into it (:meth:`Settings.from_args`), and a worker
gets exactly the supervisor's settings as arguments (:meth:`Settings.to_argv`): a new
option is one field here, and no place can forget to pass it on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Callable

LOG_LEVELS = ("debug", "info", "warning", "error")


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


def option(default: Any, flag: str, help: str, *, metavar: str | None = None,
           env: str | None = None, type: Callable | None = None,
           choices: tuple | None = None) -> Any:
    """A Settings field: ``default``, set with ``flag`` (or environment variable ``env``)."""
    return dataclasses.field(default=default, metadata={
        "flag": flag, "help": help, "metavar": metavar, "env": env,
        "type": type or builtin_type(default), "choices": choices})


def builtin_type(default: Any) -> Callable:
    return type(default) if default is not None else str


@dataclasses.dataclass(frozen=True)
class Settings:
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
                                 "none)", env="FLYPROXY_CONN_LOG_LEVEL",
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

    @property
    def conn_log_levelno(self) -> int | None:
        """The access log's level, None when it is off."""
        if self.conn_log_level == "off":
            return None
        return logging.getLevelName(self.conn_log_level.upper())

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(**{f.name: getattr(args, f.name) for f in cls.options()})

    def to_argv(self) -> list[str]:
        """These settings as ``serve`` arguments (every option, explicitly): a worker's."""
        argv = []
        for f in self.options():
            value = getattr(self, f.name)
            if value is not None:
                argv += [f.metadata["flag"], str(value)]
        return argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every Settings option as an argument of ``parser`` (dest: the field's name); an
    option's environment variable, if it has one, gives its default."""
    for f in Settings.options():
        meta = f.metadata
        default = f.default
        if meta["env"] and os.environ.get(meta["env"]):
            default = meta["type"](os.environ[meta["env"]])
        parser.add_argument(meta["flag"], dest=f.name, default=default, type=meta["type"],
                            choices=meta["choices"], metavar=meta["metavar"], help=meta["help"])
