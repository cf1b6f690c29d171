"""The pinned steering state: what ``sync``, ``register``, ``status`` and ``unload`` work on.

State lives in pins, not in a daemon. A state dir in bpffs holds::

    prog                the sk_lookup program
    link                the BPF link attaching it to one network namespace
    flyproxy_ports      hash: port (u16, host order) -> app index (u32)
    flyproxy_listener   sockmap, one slot: the proxy's listening socket
    flyproxy_lanes      sockmap, LANES slots: a member of each lane's SO_REUSEPORT group
    flyproxy_group      sockmap, one slot: a member of the workers' SO_REUSEPORT group
                        (before lanes: what an older proxy registers)
    flyproxy_counters   per-CPU array of outcome counters

Nothing here imports bcc: after loading, everything is plain bpf() commands.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from ..config import Config
from ..dataplane.listeners import LANES  # an app's connections queue in lane (index % LANES)
from . import DEFAULT_PIN_DIR
from . import syscalls as sc

PORTS, LISTENER, COUNTERS = "flyproxy_ports", "flyproxy_listener", "flyproxy_counters"
GROUP = "flyproxy_group"  # pinned by `bpf load` (an older state gains it on its next load)
LANES_MAP = "flyproxy_lanes"  # (likewise)
COUNTER_NAMES = ("steered", "no_listener", "assign_failed")  # the enum in bpf/steer.c
# What a compatible pinned map looks like: (key size, value size).
MAP_SHAPES = {PORTS: (2, 4), LISTENER: (4, 8), COUNTERS: (4, 8), GROUP: (4, 8),
              LANES_MAP: (4, 8)}


class SteeringError(Exception):
    """A problem the operator can fix; the message says what and how."""


def is_bpffs(path: str | Path) -> bool:
    """Is ``path`` (or its closest existing ancestor) on a bpf filesystem?"""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    best, fstype = "", ""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, typ = line.split()[:3]
        mnt = mnt.replace("\\040", " ")
        if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, typ
    return fstype == "bpf"


def ensure_bpffs(pin_dir: str | Path) -> None:
    """Mount bpffs at /sys/fs/bpf if the default place is not mounted; else require bpffs."""
    pin_dir = Path(pin_dir)
    if is_bpffs(pin_dir.parent):
        return
    if pin_dir.parent == Path("/sys/fs/bpf"):
        import subprocess
        result = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"],
                                capture_output=True, text=True)
        if result.returncode == 0:
            return
        raise SteeringError(f"cannot mount bpffs on /sys/fs/bpf: {result.stderr.strip()}")
    raise SteeringError(f"{pin_dir.parent} is not on a bpf filesystem "
                        f"(mount one: mount -t bpf bpf {pin_dir.parent})")


class PinnedState:
    """Open fds on a pinned state dir. Use as a context manager."""

    def __init__(self, pin_dir: str | Path = DEFAULT_PIN_DIR, readonly: bool = False):
        self.pin_dir = Path(pin_dir)
        if not (self.pin_dir / "link").exists():
            raise SteeringError(f"no steering state at {self.pin_dir} "
                                f"(run: flyproxy bpf load -c CONFIG --pin-dir {self.pin_dir})")
        self.fds: dict[str, int] = {}
        try:
            for name in ("prog", "link", PORTS, LISTENER, COUNTERS, GROUP, LANES_MAP):
                if name in (GROUP, LANES_MAP) and not (self.pin_dir / name).exists():
                    continue  # pinned by an older version; `bpf load` adds it
                self.fds[name] = sc.obj_get(str(self.pin_dir / name), readonly and name in MAP_SHAPES)
            self._check_compatible()
        except BaseException:
            self.close()
            raise

    def _check_compatible(self) -> None:
        for name, (key_size, value_size) in MAP_SHAPES.items():
            if name not in self.fds:
                continue
            info = sc.map_info(self.fds[name])
            if (info["key_size"], info["value_size"]) != (key_size, value_size):
                raise SteeringError(
                    f"{self.pin_dir / name} has key/value sizes {info['key_size']}/"
                    f"{info['value_size']}, expected {key_size}/{value_size}: pinned by an "
                    f"incompatible version; run `flyproxy bpf unload` then `load`")

    def __enter__(self) -> PinnedState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    # -- ports --------------------------------------------------------------------

    def ports(self) -> dict[int, int]:
        fd = self.fds[PORTS]
        out = {}
        for key in sc.map_keys(fd, 2):
            value = sc.map_lookup(fd, key, 4)
            if value is not None:
                out[struct.unpack("=H", key)[0]] = struct.unpack("=I", value)[0]
        return out

    def sync(self, config: Config) -> tuple[set[int], set[int]]:
        """Make the port map equal ``config``: add new ports first, then delete removed ones.

        Kept ports whose app did not change are not touched, so they never miss a
        connection. Returns (added or changed, removed).
        """
        fd = self.fds[PORTS]
        want = {port: index for index, app in enumerate(config.apps) for port in app.ports}
        have = self.ports()
        changed = {p for p, i in want.items() if have.get(p) != i}
        removed = set(have) - set(want)
        for port in sorted(changed):
            sc.map_update(fd, struct.pack("=H", port), struct.pack("=I", want[port]))
        for port in sorted(removed):
            sc.map_delete(fd, struct.pack("=H", port))
        return changed, removed

    # -- listener ---------------------------------------------------------------------

    def register(self, sock: socket.socket) -> int:
        """Put the listening socket in the sockmap; returns its socket cookie."""
        sc.map_update(self.fds[LISTENER], struct.pack("=I", 0), struct.pack("=Q", sock.fileno()))
        return socket_cookie(sock)

    def listener_cookie(self) -> int | None:
        value = sc.map_lookup(self.fds[LISTENER], struct.pack("=I", 0), 8)
        return None if value is None else struct.unpack("=Q", value)[0]

    def register_group(self, sock: socket.socket | None) -> int | None:
        """Put a member of the workers' SO_REUSEPORT group in its sockmap (None: clear it,
        so everything goes to the listener); returns the member's socket cookie."""
        if GROUP not in self.fds:
            raise SteeringError(f"{self.pin_dir} has no {GROUP} map (pinned by an older "
                                "version): run `flyproxy bpf load` to add it")
        key = struct.pack("=I", 0)
        if sock is None:
            if self.group_cookie() is not None:  # deleting an empty sockmap slot is EINVAL
                sc.map_delete(self.fds[GROUP], key)
            return None
        sc.map_update(self.fds[GROUP], key, struct.pack("=Q", sock.fileno()))
        return socket_cookie(sock)

    def register_lanes(self, members: list[socket.socket]) -> list[int]:
        """Fill every lane: slot i takes ``members[i % len(members)]`` (a member of each
        lane's group; fewer groups than lanes share them); [] clears them all. Returns the
        cookies, slot by slot."""
        if LANES_MAP not in self.fds:
            raise SteeringError(f"{self.pin_dir} has no {LANES_MAP} map (pinned by an older "
                                "version): run `flyproxy bpf load` to add it")
        fd = self.fds[LANES_MAP]
        for lane in range(LANES):
            key = struct.pack("=I", lane)
            if members:
                sc.map_update(fd, key, struct.pack("=Q", members[lane % len(members)].fileno()))
            elif sc.map_lookup(fd, key, 8) is not None:  # (deleting an empty slot is EINVAL)
                sc.map_delete(fd, key)
        return self.lane_cookies()

    def lane_cookies(self) -> list[int]:
        """The socket cookie in each lane that has one."""
        if LANES_MAP not in self.fds:
            return []
        cookies = (sc.map_lookup(self.fds[LANES_MAP], struct.pack("=I", lane), 8)
                   for lane in range(LANES))
        return [struct.unpack("=Q", v)[0] for v in cookies if v is not None]

    def group_cookie(self) -> int | None:
        if GROUP not in self.fds:
            return None
        value = sc.map_lookup(self.fds[GROUP], struct.pack("=I", 0), 8)
        return None if value is None else struct.unpack("=Q", value)[0]

    # -- introspection ------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        ncpu = sc.possible_cpus()
        out = {}
        for index, name in enumerate(COUNTER_NAMES):
            raw = sc.map_lookup(self.fds[COUNTERS], struct.pack("=I", index), 8 * ncpu) or b""
            out[name] = sum(struct.unpack(f"={len(raw) // 8}Q", raw))
        return out

    def status(self) -> dict:
        prog = sc.prog_info(self.fds["prog"])
        link = sc.link_info(self.fds["link"])
        return {
            "pin_dir": str(self.pin_dir),
            "program": {"id": prog["id"], "tag": prog["tag"], "name": prog["name"]},
            "link": {"id": link["id"], "prog_id": link["prog_id"], "netns_ino": link["netns_ino"]},
            "ports": self.ports(),
            "listener_cookie": self.listener_cookie(),
            "group_cookie": self.group_cookie(),
            "lane_cookies": self.lane_cookies(),
            "counters": self.counters(),
        }


def socket_cookie(sock: socket.socket) -> int:
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, sc.SO_COOKIE, 8))[0]


def unload(pin_dir: str | Path) -> list[str]:
    """Unpin everything in the state dir; the link (and so the program) goes with its last pin."""
    pin_dir = Path(pin_dir)
    removed = []
    if not pin_dir.exists():
        return removed
    for entry in sorted(pin_dir.iterdir()):
        entry.unlink()
        removed.append(entry.name)
    pin_dir.rmdir()
    return removed
