"""Thin ctypes wrappers for the bpf(2) commands the control plane needs.

bcc compiles and loads the program; everything after that (pinning, the
sk_lookup link, map updates, introspection) is a handful of bpf() commands,
done here directly so that ``sync``, ``register``, ``status`` and ``unload``
never need bcc or a compiler. Every wrapper raises OSError with errno set.
"""

from __future__ import annotations

import ctypes
import os
import struct

import functools


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc

# System call numbers per architecture (bpf(2) is not in Python's os module, pidfd_getfd
# neither). Numbers from 424 on are the same on every architecture; bpf's are not.
_SYSCALLS = {  # machine -> (bpf, pidfd_open, pidfd_getfd)
    "x86_64": (321, 434, 438),
    "aarch64": (280, 434, 438),  # the generic table (include/uapi/asm-generic/unistd.h)
}


def _numbers() -> tuple[int, int, int]:
    machine = os.uname().machine
    try:
        return _SYSCALLS[machine]
    except KeyError:
        raise OSError(0, f"no bpf() system call number for this architecture ({machine}); "
                         f"flyproxy's BPF commands support {', '.join(_SYSCALLS)}") from None


SYS_bpf, SYS_pidfd_open, SYS_pidfd_getfd = _SYSCALLS.get(os.uname().machine, (-1, -1, -1))

MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 1, 2, 3, 4
OBJ_PIN, OBJ_GET = 6, 7
OBJ_GET_INFO_BY_FD = 15
LINK_CREATE, LINK_UPDATE = 28, 29

PROG_TYPE_SK_LOOKUP = 30
ATTACH_SK_LOOKUP = 36
BPF_ANY, BPF_NOEXIST = 0, 1
BPF_F_RDONLY = 1 << 3  # file_flags for OBJ_GET

SO_COOKIE = 57


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def bpf(cmd: int, attr: bytes | ctypes.Array, what: str) -> int:
    buf = attr if isinstance(attr, ctypes.Array) else ctypes.create_string_buffer(attr, 128)
    return _check(_libc().syscall(_numbers()[0], cmd, buf, ctypes.sizeof(buf)), what)


def _addr(buf) -> int:
    return ctypes.addressof(buf)


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, struct.pack("=QII", _addr(p), fd, 0), f"pin {path}")


def obj_get(path: str, readonly: bool = False) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    flags = BPF_F_RDONLY if readonly else 0
    return bpf(OBJ_GET, struct.pack("=QII", _addr(p), 0, flags), f"open pinned {path}")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return bpf(LINK_CREATE, struct.pack("=IIII", prog_fd, target_fd, attach_type, 0),
               "attach program (BPF_LINK_CREATE)")


def link_update(link_fd: int, new_prog_fd: int) -> None:
    bpf(LINK_UPDATE, struct.pack("=IIII", link_fd, new_prog_fd, 0, 0),
        "replace program in link (BPF_LINK_UPDATE)")


def _info(fd: int, size: int, what: str) -> bytes:
    info = ctypes.create_string_buffer(size)
    bpf(OBJ_GET_INFO_BY_FD, struct.pack("=IIQ", fd, size, _addr(info)), what)
    return info.raw


def prog_info(fd: int) -> dict:
    raw = _info(fd, 80, "program info")
    ptype, pid = struct.unpack_from("=II", raw, 0)
    return {"type": ptype, "id": pid, "tag": raw[8:16].hex(),
            "name": raw[64:80].split(b"\0")[0].decode()}


def map_info(fd: int) -> dict:
    raw = _info(fd, 40, "map info")
    mtype, mid, key_size, value_size, max_entries = struct.unpack_from("=IIIII", raw, 0)
    return {"type": mtype, "id": mid, "key_size": key_size, "value_size": value_size,
            "max_entries": max_entries, "name": raw[24:40].split(b"\0")[0].decode()}


def link_info(fd: int) -> dict:
    raw = _info(fd, 24, "link info")
    ltype, lid, prog_id, netns_ino, attach_type = struct.unpack_from("=IIIxxxxII", raw, 0)
    return {"type": ltype, "id": lid, "prog_id": prog_id, "netns_ino": netns_ino,
            "attach_type": attach_type}


def _elem(cmd: int, fd: int, key: bytes, value, flags: int, what: str) -> int:
    k = ctypes.create_string_buffer(key, len(key))
    v = value if value is None or isinstance(value, ctypes.Array) else \
        ctypes.create_string_buffer(value, len(value))
    attr = struct.pack("=IIQQQ", fd, 0, _addr(k), _addr(v) if v is not None else 0, flags)
    return bpf(cmd, attr, what)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _elem(MAP_UPDATE_ELEM, fd, key, value, flags, "map update")


def map_delete(fd: int, key: bytes) -> None:
    _elem(MAP_DELETE_ELEM, fd, key, None, 0, "map delete")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    out = ctypes.create_string_buffer(value_size)
    try:
        _elem(MAP_LOOKUP_ELEM, fd, key, out, 0, "map lookup")
    except FileNotFoundError:
        return None
    return out.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key in a hash map (GET_NEXT_KEY from no key walks from the start)."""
    keys: list[bytes] = []
    out = ctypes.create_string_buffer(key_size)
    attr = struct.pack("=IIQQQ", fd, 0, 0, _addr(out), 0)
    try:
        bpf(MAP_GET_NEXT_KEY, attr, "map keys")
    except FileNotFoundError:
        return keys
    while True:
        keys.append(out.raw)
        cur = ctypes.create_string_buffer(out.raw, key_size)
        try:
            bpf(MAP_GET_NEXT_KEY, struct.pack("=IIQQQ", fd, 0, _addr(cur), _addr(out), 0),
                "map keys")
        except FileNotFoundError:
            return keys


def possible_cpus() -> int:
    """How many slots a per-CPU map value has (the kernel's possible CPUs)."""
    text = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def pidfd_getfd(pid: int, fd: int) -> int:
    """Duplicate fd ``fd`` of process ``pid`` into this process (needs ptrace rights)."""
    pidfd = _check(_libc().syscall(_numbers()[1], pid, 0), f"pidfd_open({pid})")
    try:
        return _check(_libc().syscall(_numbers()[2], pidfd, fd, 0), f"pidfd_getfd({pid}, {fd})")
    finally:
        os.close(pidfd)
