"""Connection limits per app and per client address, counted over every worker of a host.

The counts live in one table in shared memory (a memfd): the supervisor makes it and hands
it to each worker it starts, with a *column* of its own; a single process makes a private
one. A table entry is keyed by (app, client address), or (app, everyone) for the app-wide
limits, and holds

- one open-connection count per column: a worker only ever writes its own column, and a
  worker that dies has its column zeroed by the supervisor (``clear``), so the connections
  that died with it stop counting;
- a token bucket (tokens, last refill) for the connection rates.

Admission (``admit``) runs under a lock on the table (a POSIX record lock on the memfd:
one ``fcntl`` to take it, one to give it back), so the check and the increment are one
step for the whole host: with N allowed, N are served and the (N+1)th is refused, however
the kernel spreads connections over the workers. A close only decrements the worker's own
column (no lock: nobody else writes it; another worker reading the old value a moment
later errs on the side of refusing). Only apps that have a limit pay for any of this: the
proxy asks ``admit`` only for them.

The table is bounded: ``CAPACITY`` entries (about 7 MB with 16 columns), found by linear
probing over at most ``PROBE`` slots. A new client takes a free slot, else the least
recently used entry with no open connection in that window (its rate state is lost: at
worst it gets a fresh burst); when every slot in its window holds open connections, the
client is not tracked (its connection is admitted on the app-wide limits alone, and
counted as ``untracked``): a scan from a million addresses costs no memory beyond the
table, and cannot push out a client that has connections open.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import socket
import struct
import zlib
from typing import Iterator

from ..config import App

MAGIC = b"FLYLIM01"
HEADER = struct.Struct("<8sII")  # magic, columns, capacity
HEADER_SIZE = 64
# used, app id (8 bytes of blake2b of its name), client (16 bytes, IPv4 as ::ffff:a.b.c.d),
# tokens, last refill (CLOCK_MONOTONIC: one clock for every process of the host)
ENTRY = struct.Struct("<B7x8s16sdd")
COUNTS_AT = ENTRY.size  # then one u32 per column
TOKENS = struct.Struct("<dd")
TOKENS_AT = 1 + 7 + 8 + 16
U32 = struct.Struct("<I")
CAPACITY = 1 << 16  # entries: clients (per app) tracked at once
PROBE = 16  # slots a key may be in, from its hash
EVERYONE = b"\xff" * 16  # the client of an app-wide entry (no address is all ones)

# Why a connection was refused (the metric's "reason" label, and the log line's).
REASONS = {"max_connections": "at its limit of {n} open connections",
           "client_connections": "client at its limit of {n} open connections",
           "client_rate": "client over its limit of {n:g} new connections/s",
           "rate": "over its limit of {n:g} new connections/s"}


def app_id(name: str) -> bytes:
    """An app's key in the table: the same in every process (Python's hash() is not)."""
    return hashlib.blake2b(name.encode(), digest_size=8).digest()


def client_key(host: str) -> bytes:
    """A client address as 16 bytes; an IPv4 client as ::ffff:a.b.c.d (as a dual-stack
    listener reports it), so both spellings are one client."""
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, host)


def burst(rate: float) -> float:
    """A bucket's size: about one second's worth, at least one connection."""
    return max(1.0, rate)


def create(columns: int, capacity: int = CAPACITY) -> int:
    """A new shared table in a memfd (close-on-exec; pass it on explicitly): its fd."""
    size = _size(columns, capacity)
    fd = os.memfd_create("flyproxy-limits", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)  # zeros: every slot unused
        os.pwrite(fd, HEADER.pack(MAGIC, columns, capacity), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _entry_size(columns: int) -> int:
    return (COUNTS_AT + 4 * columns + 7) // 8 * 8


def _size(columns: int, capacity: int) -> int:
    return HEADER_SIZE + capacity * _entry_size(columns)


class LimitsError(Exception):
    pass


class Table:
    """A view of a limits table, writing one column.

    ``Table()`` is a private one (a single process: one column, no lock);
    ``Table(fd, column)`` maps the shared one a supervisor made.
    """

    def __init__(self, fd: int | None = None, column: int = 0, capacity: int = CAPACITY) -> None:
        self.shared = fd is not None
        if fd is None:
            columns = 1
            self.map = mmap.mmap(-1, _size(columns, capacity))
        else:
            head = os.pread(fd, HEADER.size, 0)
            if len(head) < HEADER.size:
                raise LimitsError(f"fd {fd} is not a limits table (too short)")
            magic, columns, capacity = HEADER.unpack(head)
            if magic != MAGIC:
                raise LimitsError(f"fd {fd} is not a limits table (magic {magic!r})")
            if not 0 <= column < columns:
                raise LimitsError(f"column {column} is not in the table's 0..{columns - 1}")
            self.map = mmap.mmap(fd, _size(columns, capacity), mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self.fd = fd
        self.columns, self.capacity, self.column = columns, capacity, column
        self.entry_size = _entry_size(columns)
        self.counts = struct.Struct(f"<{columns}I")
        self.untracked = 0  # clients admitted without an entry (their window was full)
        self._apps: dict[str, bytes] = {}
        # app -> until when its whole bucket is surely empty (monotonic): under a flood
        # most connections are refused here, without the lock or a look at the table
        self._empty_until: dict[str, float] = {}

    def __repr__(self) -> str:
        kind = f"shared fd={self.fd} column={self.column}/{self.columns}" if self.shared \
            else "private"
        return f"<limits.Table {kind} capacity={self.capacity}>"

    def close(self) -> None:
        self.map.close()

    # -- the lock --------------------------------------------------------------------------

    def _lock(self) -> None:
        if self.shared:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        if self.shared:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- entries ---------------------------------------------------------------------------

    def _find(self, app: bytes, client: bytes, now: float, start_tokens: float) -> int:
        """The offset of (app, client)'s entry, made if new (-1: no room in its window)."""
        m, size = self.map, self.entry_size
        key = app + client
        first = zlib.crc32(key) % self.capacity
        free = victim = -1
        oldest = float("inf")
        for i in range(PROBE):
            off = HEADER_SIZE + (first + i) % self.capacity * size
            if not m[off]:  # never used: the key is in no later slot either
                free = off
                break
            if m[off + 8:off + 32] == key:
                return off
            if victim < 0 or oldest > 0:
                if not any(self.counts.unpack_from(m, off + COUNTS_AT)):
                    stamp = TOKENS.unpack_from(m, off + TOKENS_AT)[1]
                    if stamp < oldest:
                        oldest, victim = stamp, off
        off = free if free >= 0 else victim
        if off < 0:
            return -1
        ENTRY.pack_into(m, off, 1, app, client, start_tokens, now)
        m[off + COUNTS_AT:off + self.entry_size] = bytes(self.entry_size - COUNTS_AT)
        return off

    def open_count(self, off: int) -> int:
        return sum(self.counts.unpack_from(self.map, off + COUNTS_AT))

    def _token(self, off: int, rate: float, now: float) -> bool:
        """Refill the bucket at ``off``; is a token there? (Taken by _take.)"""
        tokens, stamp = TOKENS.unpack_from(self.map, off + TOKENS_AT)
        tokens = min(burst(rate), tokens + max(0.0, now - stamp) * rate)
        TOKENS.pack_into(self.map, off + TOKENS_AT, tokens, now)
        return tokens >= 1.0

    def _take(self, off: int) -> None:
        tokens, stamp = TOKENS.unpack_from(self.map, off + TOKENS_AT)
        TOKENS.pack_into(self.map, off + TOKENS_AT, tokens - 1.0, stamp)

    def _add(self, off: int, n: int) -> None:
        at = off + COUNTS_AT + 4 * self.column
        U32.pack_into(self.map, at, U32.unpack_from(self.map, at)[0] + n)

    # -- what the proxy asks ---------------------------------------------------------------

    def admit(self, app: App, host: str, now: float) -> tuple[str | None, tuple[int, ...]]:
        """May a new connection from ``host`` to ``app`` open? (None, the entries it is
        counted in: give them to :meth:`release` when it closes) or (the reason it may not,
        ())."""
        if app.rate is not None and now < self._empty_until.get(app.name, 0.0):
            return "rate", ()  # (a token cannot have come yet, in any worker)
        key = self._apps.get(app.name)
        if key is None:
            key = self._apps[app.name] = app_id(app.name)
        self._lock()
        try:
            client = whole = -1
            if app.per_client:
                client = self._find(key, client_key(host), now, burst(app.rate_per_client or 1))
                if client < 0:
                    self.untracked += 1
                else:
                    if app.max_per_client is not None and \
                            self.open_count(client) >= app.max_per_client:
                        return "client_connections", ()
                    if app.rate_per_client is not None and \
                            not self._token(client, app.rate_per_client, now):
                        return "client_rate", ()
            if app.max_connections is not None or app.rate is not None:
                whole = self._find(key, EVERYONE, now, burst(app.rate or 1))
                if whole < 0:  # (app-wide entries are few: only a window full of clients
                    self.untracked += 1  # with open connections crowds one out)
                else:
                    if app.max_connections is not None and \
                            self.open_count(whole) >= app.max_connections:
                        return "max_connections", ()
                    if app.rate is not None and not self._token(whole, app.rate, now):
                        tokens = TOKENS.unpack_from(self.map, whole + TOKENS_AT)[0]
                        self._empty_until[app.name] = now + (1.0 - tokens) / app.rate
                        return "rate", ()
            # admitted: counted (in our column) and charged a token, in both
            if client >= 0:
                self._add(client, 1)
                if app.rate_per_client is not None:
                    self._take(client)
            if whole >= 0:
                self._add(whole, 1)
                if app.rate is not None:
                    self._take(whole)
            return None, tuple(off for off in (client, whole) if off >= 0)
        finally:
            self._unlock()

    def empty_for(self, app: App, now: float) -> float:
        """Seconds until ``app``'s whole bucket can hold a token again (0: it may now; a
        millisecond more, so a timer that fires early still finds the token there)."""
        left = self._empty_until.get(app.name, 0.0) - now
        return left + 0.001 if left > 0 else 0.0

    def release(self, held: tuple[int, ...]) -> None:
        """A connection admitted with ``held`` closed (no lock: only we write our column)."""
        for off in held:
            self._add(off, -1)

    def _slots(self) -> Iterator[int]:
        """The offsets of the slots that may be in use: only those in pages the table has
        written (a shared table asks the memfd where its data is; reading the rest through
        the map would make the kernel allocate every page of it)."""
        size, end = self.entry_size, HEADER_SIZE + self.capacity * self.entry_size
        ranges = [(HEADER_SIZE, end)]
        if self.shared:
            ranges, at = [], 0
            while at < end:
                try:
                    start = os.lseek(self.fd, at, os.SEEK_DATA)
                except OSError:  # ENXIO: no data past ``at``
                    break
                at = os.lseek(self.fd, start, os.SEEK_HOLE)
                ranges.append((max(start, HEADER_SIZE), min(at, end)))
        for start, stop in ranges:
            first = max(0, (start - HEADER_SIZE) // size)
            last = min(self.capacity, (stop - HEADER_SIZE + size - 1) // size)
            for i in range(first, last):
                yield HEADER_SIZE + i * size

    def clear(self, column: int) -> None:
        """Zero ``column`` everywhere: its worker is gone, and so are its connections."""
        m, zero = self.map, bytes(4)
        self._lock()
        try:
            for off in self._slots():
                at = off + COUNTS_AT + 4 * column
                if m[at:at + 4] != zero:
                    m[at:at + 4] = zero
        finally:
            self._unlock()

    def entries(self) -> int:
        """Slots in use (status)."""
        return sum(1 for off in self._slots() if self.map[off])
