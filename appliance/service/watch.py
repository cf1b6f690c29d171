"""``serve --watch``: reload when the config file changes.

inotify watches the file's *directory*, so every way an operator or a tool replaces a
file is seen: an editor's write-then-rename, ``cp`` + ``mv``, Ansible's atomic move (all
IN_MOVED_TO), and a write in place (IN_CLOSE_WRITE: once the writer has closed it, never
while it is half written). Events for the file are debounced (a burst is one reload, run
DEBOUNCE_S after the last event), and a file whose bytes are the config in force is not
reloaded again. A file that does not load is the reload's business: it logs every
problem, the old config keeps serving, and the next change is tried afresh.

No dependency: inotify is three system calls, made through libc with ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import struct
from typing import Awaitable, Callable

from .. import config as configmod

log = logging.getLogger(__name__)

IN_CLOSE_WRITE, IN_MOVED_TO, IN_Q_OVERFLOW = 0x00000008, 0x00000080, 0x00004000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
DEBOUNCE_S = 0.2
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class WatchError(Exception):
    pass


class ConfigWatcher:
    """Calls ``reload()`` (a coroutine function) when ``path`` changes; ``current()``
    gives the digest of the config in force."""

    def __init__(self, path: str, reload: Callable[[], Awaitable], current: Callable[[], str]):
        self.path = os.path.abspath(path)
        self.directory, self.name = os.path.split(self.path)
        self.reload, self.current = reload, current
        self.fd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None
        self._again = False

    def start(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise WatchError(f"inotify: {os.strerror(ctypes.get_errno())}")
        if libc.inotify_add_watch(fd, os.fsencode(self.directory),
                                  IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise WatchError(f"cannot watch {self.directory}: {os.strerror(err)}")
        self.fd = fd
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(fd, self._readable)
        log.info("watching %s for changes (reloaded %gs after the last)", self.path, DEBOUNCE_S)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1

    def _readable(self) -> None:
        ours = False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            ours = ours or self._names_ours(data)
        if ours:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(DEBOUNCE_S, self._settled)

    def _names_ours(self, data: bytes) -> bool:
        offset, wanted = 0, os.fsencode(self.name)
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size:offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW or name == wanted:  # an overflow may have hidden ours
                return True
        return False

    def _settled(self) -> None:
        self._timer = None
        if self._task is not None and not self._task.done():
            self._again = True  # a reload is running: once more after it, on what is there
            return
        self._task = self.loop.create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._again = False
            try:  # the reload's own reader: off the loop, a regular file only, bounded
                digest = hashlib.sha256(await asyncio.to_thread(configmod.read, self.path)
                                        ).hexdigest()
            except configmod.ConfigError:
                digest = None  # unreadable, not a regular file, too large: the reload says why
            if digest != self.current():
                log.info("%s changed: reloading", self.path)
                await self.reload()
            if not self._again:
                return
