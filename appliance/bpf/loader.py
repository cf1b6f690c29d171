"""Compile and load ``bpf/steer.c`` with bcc; attach and pin it. The only module that imports bcc.

``load`` is idempotent:
- no state yet: compile, load, fill the port map, attach to this network
  namespace with a BPF link, and pin it all into a temporary dir that is then
  renamed into place, so the state dir is never seen half-made;
- state present, same program (same tag): only sync the port map;
- state present, different program (an upgrade): compile against the pinned maps
  (ports and listener are kept), swap the program in the existing link with
  BPF_LINK_UPDATE (atomic: no connection sees a gap), re-pin the program.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from ..config import Config
from . import SOURCE
from . import syscalls as sc
from .state import (COUNTERS, GROUP, LANES_MAP, LISTENER, PORTS, PinnedState, SteeringError,
                    ensure_bpffs)

FUNCTION = "flyproxy_steer"
MIN_KERNEL = (5, 9)  # sk_lookup programs and BPF links for them


def probe() -> list[str]:
    """What this host lacks for BPF steering; [] when all is there."""
    missing = []
    release = platform.release()
    try:
        version = tuple(int(x) for x in release.split("-")[0].split(".")[:2])
        if version < MIN_KERNEL:
            missing.append(f"kernel {release} is older than 5.9 (no sk_lookup programs)")
    except ValueError:
        pass
    if os.geteuid() != 0:
        missing.append("root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN) is needed to load BPF")
    if not Path(f"/lib/modules/{release}/build").exists():
        missing.append(f"kernel headers at /lib/modules/{release}/build "
                       "(run bpf/kernel-headers.sh, or install linux-headers-$(uname -r))")
    try:
        import bcc  # noqa: F401
    except ImportError:
        missing.append("bcc for this Python (Debian package python3-bpfcc; "
                       "a venv needs --system-site-packages)")
    return missing


def _require() -> None:
    missing = probe()
    if missing:
        raise SteeringError("BPF steering cannot run on this host; missing:\n  - "
                            + "\n  - ".join(missing))


def compile_program(source: Path = SOURCE, pin_dir: Path | None = None, dump: bool = False):
    """Compile and load (the verifier runs) the program; returns (bcc.BPF, prog fd)."""
    _require()
    import bcc

    cflags = [f'-DFLYPROXY_PIN_DIR="{pin_dir}"'] if pin_dir else []
    if dump:
        print(source.read_text())
    try:
        module = bcc.BPF(src_file=str(source).encode(), cflags=cflags)
        fn = module.load_func(FUNCTION, sc.PROG_TYPE_SK_LOOKUP, attach_type=sc.ATTACH_SK_LOOKUP)
    except Exception as e:  # bcc raises bare Exception for compile and verifier failures
        raise SteeringError(f"{source}: compiling or loading failed: {e} "
                            "(the compiler or verifier output is above)") from None
    return module, fn.fd


def _map_fd(module, name: str) -> int:
    from bcc.libbcc import lib

    fd = lib.bpf_table_fd(module.module, name.encode())
    if fd < 0:
        raise SteeringError(f"map {name} not found in the compiled program")
    return fd


def load(config: Config, pin_dir: Path, source: Path = SOURCE) -> str:
    """Load or update the steering state in ``pin_dir`` for ``config``; returns what happened."""
    pin_dir = Path(pin_dir)
    ensure_bpffs(pin_dir)
    for stale in pin_dir.parent.glob(pin_dir.name + "_tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if (pin_dir / "link").exists():
        return _update(config, pin_dir, source)
    return _fresh(config, pin_dir, source)


def _fresh(config: Config, pin_dir: Path, source: Path) -> str:
    module, prog_fd = compile_program(source)
    tmp = pin_dir.with_name(f"{pin_dir.name}_tmp_{os.getpid()}")
    tmp.mkdir()
    netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    link_fd = -1
    try:
        for name in (PORTS, LISTENER, COUNTERS, GROUP, LANES_MAP):
            sc.obj_pin(_map_fd(module, name), str(tmp / name))
        sc.obj_pin(prog_fd, str(tmp / "prog"))
        link_fd = sc.link_create(prog_fd, netns, sc.ATTACH_SK_LOOKUP)
        sc.obj_pin(link_fd, str(tmp / "link"))
        with PinnedState(tmp) as state:
            state.sync(config)
        tmp.rename(pin_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(netns)
        if link_fd >= 0:
            os.close(link_fd)
        module.cleanup()
    return f"loaded and attached; {len(config.ports)} ports"


def _update(config: Config, pin_dir: Path, source: Path) -> str:
    with PinnedState(pin_dir) as state:
        old = state.status()["program"]
        module, prog_fd = compile_program(source, pin_dir=pin_dir)
        try:
            new = sc.prog_info(prog_fd)
            added, removed = state.sync(config)
            if new["tag"] == old["tag"]:
                return f"already loaded (program {old['id']}); ports +{len(added)} -{len(removed)}"
            sc.link_update(state.fds["link"], prog_fd)
            tmp = pin_dir / "prog_new"  # bpffs reserves names with dots
            sc.obj_pin(prog_fd, str(tmp))
            tmp.rename(pin_dir / "prog")
            return (f"program replaced ({old['tag']} -> {new['tag']}); "
                    f"ports +{len(added)} -{len(removed)}")
        finally:
            module.cleanup()
