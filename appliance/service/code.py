"""The code a process runs, and the code on disk: is an upgrade waiting?

A package upgrade replaces the files under the package's directory while the proxy runs
on what it imported at start. :func:`identify` reads what is on disk now (the version in
``__init__.py`` and a digest of every file a worker imports); a supervisor takes it at
start, and a reload compares: content, not only the version string, so a rebuilt package
of the same version (or a hand edit) counts as new code too.

:func:`preflight` tries the code on disk in a child process before anything changes: it
imports every module a worker imports, loads the config with them and parses the ``serve``
arguments its processes will be started with. A broken install (a syntax error, a missing
dependency, an option it no longer knows) fails there, and the running workers never
notice. :func:`command` is how a new process of ours is started on the code on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # .../appliance
SUFFIXES = (".py", ".json")  # what the package's processes read (bpf/ only in the helpers)
PREFLIGHT_TIMEOUT_S = 60.0
# what a new process of ours runs: the package under the directory given first (the code
# on disk, whatever this process was started as), then ``flyproxy``'s command line
_BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
         "from appliance.cli import main; sys.exit(main())")


def identify(package: Path = PACKAGE) -> dict:
    """{"version", "digest"} of the code on disk under ``package``."""
    h = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in SUFFIXES
                       and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(package)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    match = re.search(r'^__version__ = "([^"]+)"', (package / "__init__.py").read_text(),
                      re.M)
    return {"version": match.group(1) if match else "unknown", "digest": h.hexdigest()[:16]}


def import_all() -> None:
    """Import every module the proxy's processes use, now: a process that imported lazily
    could load a module of the *next* version after an upgrade replaced the files (and
    dh_python3 removes the old byte code first). bpf/ is left out: it needs bcc, which
    only the privileged helpers import."""
    import importlib
    import pkgutil

    import appliance
    for m in pkgutil.walk_packages(appliance.__path__, "appliance."):
        if not m.name.startswith("appliance.bpf") and not m.name.endswith("__main__"):
            importlib.import_module(m.name)


# Run in the child, from the code on disk: import every module, load the config from
# stdin, parse the command line given as JSON, print what ran.
_PREFLIGHT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from appliance.service import code
code.import_all()
from appliance import config
config.loads(sys.stdin.buffer.read(), sys.argv[2])
from appliance.cli import build_parser
build_parser().parse_args(json.loads(sys.argv[3]))
print(json.dumps(code.identify()))
"""


class PreflightError(Exception):
    pass


def preflight(config_raw: bytes, source: str, argv: list[str],
              package: Path = PACKAGE) -> dict:
    """Try the code on disk on ``config_raw`` and the command line ``argv``: its identity,
    or PreflightError with the child's error."""
    flags = ["-I"] if sys.flags.isolated else []
    try:
        out = subprocess.run([sys.executable, *flags, "-c", _PREFLIGHT, str(package.parent),
                              source, json.dumps(argv)], input=config_raw,
                             capture_output=True, timeout=PREFLIGHT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise PreflightError(f"the new code did not load in {PREFLIGHT_TIMEOUT_S:g}s") from None
    if out.returncode != 0:
        lines = out.stderr.decode(errors="replace").strip().splitlines()
        raise PreflightError("the new code does not load: " + "\n".join(lines[-6:]))
    return json.loads(out.stdout)


def package_parent() -> str:
    """The directory holding the ``appliance`` package on disk (what a new process runs)."""
    return str(PACKAGE.parent)


def command(argv: list[str]) -> list[str]:
    """``flyproxy ARGV`` as a new process of ours: this interpreter (isolated if we are),
    the code on disk."""
    flags = ["-I"] if sys.flags.isolated else []
    return [sys.executable, *flags, "-c", _BOOT, package_parent(), *argv]
