"""``flyproxy bpf ...``: the arguments of the steering commands (``appliance/bpf/commands.py``
does the work). Parsing them imports nothing privileged."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import sys
import tempfile
import time

from ..bpf import DEFAULT_PIN_DIR, SOURCE
from ..settings import DEFAULT_CONFIG, default_config, default_control


def add_commands(sub) -> None:
    bpf = sub.add_parser("bpf", help="manage sk_lookup steering (privileged)")
    cmds = bpf.add_subparsers(dest="bpf_command", required=True, metavar="COMMAND")

    def common(p, config=False):
        p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR,
                       help=f"state dir in bpffs (default {DEFAULT_PIN_DIR})")
        if config:
            p.add_argument("-c", "--config", default=default_config(),
                           help="config file whose ports are steered (default "
                                f"$FLYPROXY_CONFIG, else {DEFAULT_CONFIG})")
        return p

    p = cmds.add_parser("build", help="compile and verify the program without attaching it")
    p.add_argument("--source", default=str(SOURCE),
                   help=f"the sk_lookup program's C source (default {SOURCE})")
    p.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)  # print the final C
    p.set_defaults(func="build")

    p = common(cmds.add_parser("load", help="load, attach and pin; fill the port map"), True)
    p.add_argument("--source", default=str(SOURCE),
                   help=f"the sk_lookup program's C source (default {SOURCE})")
    p.set_defaults(func="load")

    common(cmds.add_parser("sync", help="make the port map equal the config"), True) \
        .set_defaults(func="sync")

    p = common(cmds.add_parser("register", help="put the proxy's listening socket in the sockmap"))
    p.add_argument("--fd", type=int, help="fd number (of this process, or of --pid)")
    p.add_argument("--pid", type=int, help="take the socket from this process (pidfd_getfd)")
    p.add_argument("--port", type=int, help="with --pid: the listening socket on this port")
    p.add_argument("--control", default=default_control(), metavar="PATH",
                   help="with --pid: the proxy's control socket, which names its listeners "
                        "(default: as for flyproxy status)")
    p.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="with --pid: wait this long for a proxy that is still starting "
                        "(default 10)")
    p.add_argument("--spread", action="store_true",
                   help="with --pid: also register the process's worker group (if it has one), "
                        "so connections spread evenly over its workers")
    p.set_defaults(func="register")

    p = common(cmds.add_parser("unspread", help="clear the workers' group: the listener takes "
                                                "every connection (before stopping the proxy)"))
    p.set_defaults(func="unspread")

    p = common(cmds.add_parser("status", help="show the pinned state (read-only)"))
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func="status")

    p = common(cmds.add_parser("metrics", help="steering counters in Prometheus text format (read-only)"))
    p.add_argument("--textfile", metavar="PATH",
                   help="write them here atomically (node_exporter's textfile collector)")
    p.set_defaults(func="metrics")

    common(cmds.add_parser("unload", help="detach and unpin everything")) \
        .set_defaults(func="unload")


def run(args) -> int:
    from ..bpf import commands  # (ctypes and pins; bcc only for build and load)
    from ..bpf.state import SteeringError

    try:
        with _locked(args):
            return getattr(commands, f"cmd_{args.func}")(args)
    except (SteeringError, OSError) as e:
        print(f"flyproxy bpf {args.bpf_command}: {e}", file=sys.stderr)
        return 1


READ_ONLY = ("status", "metrics")
LOCK_WAIT_S = float(os.environ.get("FLYPROXY_BPF_LOCK_WAIT", "30"))


@contextlib.contextmanager
def _locked(args):
    """One ``flyproxy bpf`` command at a time per pin dir (as tubular locks its state):
    two loads, or a sync beside an unload, never interleave their map writes. Readers
    share the lock. Bounded: past LOCK_WAIT_S the command fails, saying who holds it."""
    from ..bpf.state import SteeringError

    if args.func == "build":  # no pins
        yield
        return
    key = hashlib.sha256(os.path.realpath(args.pin_dir).encode()).hexdigest()[:12]
    directory = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
    path = os.path.join(directory, f"flyproxy-bpf-{key}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        if args.func in READ_ONLY:  # a sandboxed reader (the metrics timer: /run read-only)
            yield
            return
        raise
    try:
        mode = fcntl.LOCK_SH if args.func in READ_ONLY else fcntl.LOCK_EX
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SteeringError(f"another flyproxy bpf command is changing "
                                        f"{args.pin_dir} (lock {path} held for "
                                        f"{LOCK_WAIT_S:g}s); try again") from None
                time.sleep(0.05)  # flock has no timeout: poll, bounded
        yield
    finally:
        os.close(fd)
