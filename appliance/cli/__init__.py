"""The ``flyproxy`` command line: parsing and printing only.

Nouns that only read (``check``, ``status``, ``bpf status``) never change state; verbs do.
Errors a user can cause print one clear line per problem and exit 1; tracebacks are for
bugs. Every ``serve`` option comes from ``appliance/settings.py``. The ``bpf`` commands
(``cli/bpf.py``) import bcc only when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..settings import (CONTROL_DEFAULT_TEXT, DEFAULT_CONFIG, LOG_LEVELS, add_arguments,
                        default_control)
from . import bpf, commands, manpage


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flyproxy", description="An L4 TCP proxy appliance with sk_lookup BPF steering.")
    parser.add_argument("--version", action="version", version=f"flyproxy {__version__}")
    add_arguments(parser, "global")  # --log-level (settings.py)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def control_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--control", default=default_control(), metavar="PATH",
                       help=f"the proxy's control socket (default {CONTROL_DEFAULT_TEXT})")

    p = sub.add_parser(
        "check", help="validate a config file",
        description="Validate a config file as serve and reload would: exit 0 if it can be "
                    "served (warnings, if any, on standard error), else 1 with one line per "
                    "problem, FILE:LINE:COLUMN: PATH: what is wrong.")
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="the config file, '-' for standard input (default "
                        f"$FLYPROXY_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("-c", "--config", metavar="FILE", help="the same as FILE")
    p.set_defaults(func=commands.check)

    p = sub.add_parser("serve", help="run the proxy")
    add_arguments(p)  # every option of serve: appliance/settings.py
    p.set_defaults(func=commands.serve)

    p = sub.add_parser("reload", help="apply the config file to the running proxy, synchronously")
    p.add_argument("-c", "--config", default=None,
                   help="the file the running proxy serves (the default: asked from the proxy); "
                        "another file is refused: a proxy reloads its own file")
    control_arg(p)
    p.add_argument("--pin-dir", default=bpf.DEFAULT_PIN_DIR,
                   help=f"BPF state to sync after the proxy reloaded, if loaded "
                        f"(default {bpf.DEFAULT_PIN_DIR}; '' to skip)")
    p.add_argument("--new-workers", action="store_true",
                   help="start a new generation of workers even if the code on disk is the "
                        "code running (after a Python or library upgrade); the old ones "
                        "drain. A reload does that by itself when the code changed")
    p.set_defaults(func=commands.reload)

    p = sub.add_parser("status", help="show the running proxy (read-only)")
    control_arg(p)
    p.add_argument("--json", action="store_true", help="print the whole status as JSON")
    p.set_defaults(func=commands.status)

    p = sub.add_parser("echo", help="run a TCP echo backend")
    p.add_argument("--listen", action="append", required=True, metavar="HOST:PORT",
                   help="listen here and echo every byte back (repeatable)")
    p.set_defaults(func=commands.echo)

    p = sub.add_parser("demo", help="the challenge's apps, served by local echo targets")
    p.add_argument("--workdir", help="where to write the demo config (default: a temp dir)")
    p.add_argument("--host", default="127.0.0.1", help="address the proxy binds (default 127.0.0.1)")
    p.set_defaults(func=commands.demo)

    bpf.add_commands(sub)
    p = sub.add_parser("manpage", help="print flyproxy(8) in troff (the package installs it)")
    p.set_defaults(func=lambda args: print(manpage.render(build_parser())) or 0)
    _log_level_everywhere(parser)
    return parser


def _log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` after any (sub)command too: ``flyproxy status --log-level debug``."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            if not any("--log-level" in a.option_strings for a in sub._actions):
                sub.add_argument("--log-level", choices=LOG_LEVELS, type=str.lower,
                                 default=argparse.SUPPRESS,
                                 help="as before the command")
            _log_level_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if args.command == "bpf":
            return bpf.run(args)
        return args.func(args)
    except BrokenPipeError:  # `flyproxy status | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # (so the exit's flush does not fail again)
        return 0
