"""``serve --watch``: reload when the config file changes.

inotify watches *directories*, so every way an operator or a tool replaces a file is
seen: an editor's write-then-rename, ``cp`` + ``mv``, Ansible's atomic move (all
IN_MOVED_TO), and a write in place (IN_CLOSE_WRITE: once the writer has closed it, never
while it is half written). The directories watched are those the path's resolution walks
through (:func:`watch_points`): the config's own, and for each symlink on the way the
directory holding the link, so a Kubernetes ConfigMap update (a new ``..data`` symlink
renamed over the old one) is seen. After any event on one of those names, or when a
watched directory is deleted or moved, the path is resolved again and the watches follow
it; a directory that is gone is waited for in its nearest existing parent, and both the
loss and the return are logged.

Events are debounced (a burst is one check, DEBOUNCE_S after the last event). A check
reads the file with the reload's own reader (``config.read``: off the loop, a regular file
of bounded size only) and reloads only if its bytes are not the config in force. A file
that does not load is the reload's business: it logs every problem, the old config keeps
serving, and the next change is tried afresh. A file that is gone is not reloaded: the
config in force keeps serving until it is back.

No dependency: inotify is a few system calls, made through libc with ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import logging
import os
import stat
import struct
from typing import Awaitable, Callable

from .. import config as configmod

log = logging.getLogger(__name__)

IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x00000008, 0x00000040, 0x00000080
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_UNMOUNT, IN_Q_OVERFLOW, IN_IGNORED = 0x2000, 0x4000, 0x8000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
         | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW)
_SELF = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED  # the watched directory itself
DEBOUNCE_S = 0.2
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_GONE = "gone"  # what a check finds when the file does not exist
MISSING, LOOP = "does not exist", "is in a loop of symbolic links"


class WatchError(Exception):
    pass


def watch_points(path: str) -> tuple[dict[str, set[str]], tuple[str, str] | None]:
    """Where a change could alter what absolute ``path`` reads: {directory: names in it},
    and where the walk stopped, (that path, MISSING or LOOP), or None if it resolves.

    The walk is the kernel's: the directories it passes through are real (no symlink in
    them), each symlink met adds its own (directory, name) and is followed, and the last
    component adds its. A missing component is watched for in the directory that should
    hold it, the nearest existing one. Only metadata is read (lstat, readlink)."""
    points: dict[str, set[str]] = {}
    parts = [p for p in path.split("/") if p not in ("", ".")]
    current, links = "/", 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            current = os.path.dirname(current)
            continue
        full = os.path.join(current, name)
        points.setdefault(current, set()).add(name)  # (a plain directory's is dropped below)
        try:
            mode = os.lstat(full).st_mode
            target = os.readlink(full) if stat.S_ISLNK(mode) else None
        except FileNotFoundError:  # wait for it here, in the nearest existing directory
            return points, (full, MISSING)
        except OSError as e:
            return points, (full, f"cannot be looked up ({e.strerror})")
        if target is not None:
            links += 1
            if links > MAX_SYMLINKS:
                return points, (full, LOOP)
            current = "/" if target.startswith("/") else current
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
        elif parts:
            if not stat.S_ISDIR(mode):
                return points, (full, "is not a directory")
            points[current].discard(name)  # a real directory on the way: not watched
            if not points[current]:
                del points[current]
            current = full
    return points, None


class ConfigWatcher:
    """Calls ``reload()`` (a coroutine function) when ``path`` changes; ``current()``
    gives the digest of the config in force."""

    def __init__(self, path: str, reload: Callable[[], Awaitable], current: Callable[[], str]):
        self.path = os.path.abspath(path)
        self.reload, self.current = reload, current
        self.fd = -1
        self.watches: dict[int, set[str]] = {}  # inotify wd -> the names that matter in it
        self.dirs: dict[str, int] = {}  # directory -> its wd
        self.broken: tuple[str, str] | None = None  # where the path does not resolve, why
        self._logged: tuple | None = None  # (dirs, broken) as last logged
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._again = False

    def __repr__(self) -> str:
        return f"<ConfigWatcher {self.path} in {', '.join(self.dirs) or 'nothing'}>"

    def start(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise WatchError(f"inotify: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        error = self._rewatch()
        if error or self.broken:
            os.close(fd)
            self.fd = -1
            raise WatchError(error or f"cannot watch {self.path}: {' '.join(self.broken)}")
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(fd, self._readable)
        self._logged = (list(self.dirs), None)
        log.info("watching %s for changes (in %s; reloaded %gs after the last)", self.path,
                 ", ".join(self.dirs), DEBOUNCE_S)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1

    def _rewatch(self) -> str | None:
        """Resolve the path again and make the watches follow it; returns why a directory
        cannot be watched, if one cannot (e.g. no inotify watches left)."""
        for _ in range(3):  # a directory may go between the walk and the watch: walk again
            points, broken = watch_points(self.path)
            watches: dict[int, set[str]] = {}
            dirs: dict[str, int] = {}
            error, raced = None, False
            for directory, names in points.items():
                wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), _MASK)
                if wd < 0:
                    err = ctypes.get_errno()
                    raced = raced or err in (errno.ENOENT, errno.ENOTDIR)
                    error = f"cannot watch {directory}: {os.strerror(err)}"
                    continue
                watches.setdefault(wd, set()).update(names)
                dirs[directory] = wd
            if not raced:
                break
        for wd in self.watches.keys() - watches.keys():
            self._libc.inotify_rm_watch(self.fd, wd)  # (one already gone fails: no matter)
        self.watches, self.dirs, self.broken = watches, dirs, broken
        if self._logged is not None and self._logged != (list(dirs), broken):
            was, where = self._logged[1], ", ".join(dirs)
            if broken:
                log.warning("%s: %s %s; watching %s until that changes", self.path, *broken,
                            where)
            elif was:
                log.info("%s: %s %s; watching %s", self.path, was[0],
                         "is back" if was[1] == MISSING else "resolves again", where)
            else:
                log.info("%s: now watching %s", self.path, where)
            self._logged = (list(dirs), broken)
        return error

    def _readable(self) -> None:
        ours = False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            ours = self._events_ours(data) or ours
        if ours:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(DEBOUNCE_S, self._settled)

    def _events_ours(self, data: bytes) -> bool:
        offset, ours = 0, False
        while offset + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:  # an overflow may have hidden ours
                ours = True
            elif wd not in self.watches:  # (one we removed)
                continue
            elif mask & _SELF:
                ours = True
                if mask & IN_IGNORED:  # the kernel dropped the watch: the directory is gone
                    del self.watches[wd]
                    self.dirs = {d: w for d, w in self.dirs.items() if w != wd}
            elif os.fsdecode(name) in self.watches[wd]:
                ours = ours or not (mask & IN_CREATE and self._regular_file(wd, name))
        return ours

    def _regular_file(self, wd: int, name: bytes) -> bool:
        """A regular file just created: its IN_CLOSE_WRITE follows once it is written."""
        directory = next((d for d, w in self.dirs.items() if w == wd), None)
        try:
            return directory is not None and stat.S_ISREG(
                os.lstat(os.path.join(directory, os.fsdecode(name))).st_mode)
        except OSError:
            return False

    def _settled(self) -> None:
        self._timer = None
        error = self._rewatch()
        if error:
            log.warning("%s: %s; changes there are not seen", self.path, error)
        if self._task is not None and not self._task.done():
            self._again = True  # a reload is running: once more after it, on what is there
            return
        self._task = self.loop.create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._again = False
            digest = await asyncio.to_thread(self._digest)
            if digest not in (_GONE, self.current()):  # (gone: _rewatch logged it)
                log.info("%s changed: reloading", self.path)
                await self.reload()
            if not self._again:
                return

    def _digest(self) -> str | None:
        """(In a thread.) The sha256 of the file, read as a reload reads it; None if that
        fails (the reload says why), _GONE if there is no file."""
        try:
            os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return _GONE
        except OSError:
            pass  # (the reload says what)
        try:
            return hashlib.sha256(configmod.read(self.path)).hexdigest()
        except configmod.ConfigError:
            return None  # unreadable, not a regular file, too large: the reload says why
