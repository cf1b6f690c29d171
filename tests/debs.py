"""This tree's Debian package as a *newer* version, for the upgrade tests.

``make deb`` builds the package of the tree (``helpers.built_deb``); an upgrade needs a
second one that apt sees as newer and the proxy as other code: :func:`upgraded_deb`
copies the tree as ``make deb`` does, bumps the version (debian/changelog, pyproject.toml
and ``appliance.__version__``, so ``flyproxy --version`` and ``flyproxy status`` show it)
and builds it with dpkg-buildpackage, without lintian. It is cached under
build/upgrade/<digest of the tree's files but tests/>/, beside nothing ``built_deb``
or the role's ``build/flyproxy_*_all.deb`` would pick up.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "build" / "upgrade"
SUFFIX = "+upgrade1"  # Debian: 0.3.0+upgrade1 > 0.3.0; PEP 440: a local version
BUILD_TIMEOUT_S = 600
_SKIP = {"build", ".venv", ".git", ".vagrant", "__pycache__"}


def changelog_version(root: Path = REPO) -> str:
    return re.match(r"flyproxy \(([^)]+)\)", (root / "debian/changelog").read_text())[1]


def source_files(root: Path = REPO) -> list[str]:
    """What ``make deb`` copies: git's tracked and untracked-but-not-ignored files."""
    if (root / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=root, capture_output=True,
                             check=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    else:
        names = []
        for d, dirs, files in os.walk(root):
            dirs[:] = [x for x in dirs if x not in _SKIP]
            names += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(n for n in names if os.path.lexists(root / n))


def _key(root: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        if not name.startswith("tests/"):  # (not in the package)
            h.update(name.encode() + b"\0")
            if not (root / name).is_symlink():
                h.update((root / name).read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def bump(tree: Path, version: str) -> None:
    """Make the tree under ``tree`` version ``version``."""
    changelog = tree / "debian/changelog"
    text = changelog.read_text()
    trailer = re.search(r"^ -- .*$", text, re.M)[0]
    changelog.write_text(f"flyproxy ({version}) bookworm; urgency=medium\n\n"
                         "  * This tree again, as a newer version: the upgrade tests.\n\n"
                         f"{trailer}\n\n{text}")
    for rel, pattern in (("pyproject.toml", r'(?m)^version = "[^"]+"'),
                         ("appliance/__init__.py", r'(?m)^__version__ = "[^"]+"')):
        path = tree / rel
        new, n = re.subn(pattern, lambda m: re.sub(r'"[^"]+"', f'"{version}"', m[0]),
                         path.read_text())
        assert n == 1, f"{rel}: no version line"
        path.write_text(new)


def upgraded_deb(root: Path = REPO) -> Path:
    """The package of this tree as version ``<changelog version>+upgrade1``, built now
    unless cached (about 10 s)."""
    names = source_files(root)
    out = CACHE / _key(root, names)
    version = changelog_version(root) + SUFFIX
    deb = out / f"flyproxy_{version}_all.deb"
    if deb.exists():
        return deb
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:  # one build at a time (parallel test runs)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if deb.exists():
            return deb
        work = Path(tempfile.mkdtemp(dir=CACHE, prefix=".build-"))
        try:
            tree = work / "flyproxy"
            for name in names:
                src, dst = root / name, tree / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_symlink():
                    os.symlink(os.readlink(src), dst)
                else:
                    shutil.copy2(src, dst)
            bump(tree, version)
            built = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree,
                                   capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                                   env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            if built.returncode != 0:
                raise AssertionError(f"dpkg-buildpackage of {version} failed:\n"
                                     f"{(built.stdout + built.stderr)[-4000:]}")
            out.mkdir()
            (work / deb.name).rename(deb)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for old in CACHE.iterdir():  # packages of earlier trees
            if old.is_dir() and old != out and not old.name.startswith(".build-"):
                shutil.rmtree(old, ignore_errors=True)
    return deb
