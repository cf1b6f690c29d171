"""Host-name targets: resolved off the connection path, kept by TTL, on the event loop.

Every host name the config in force names is tracked here as a :class:`Name`. It is
resolved when the config is loaded or reloaded (A and AAAA, with c-ares through
``python3-pycares``: queries run on the event loop, no thread pool), kept, and refreshed
in the background before its TTL runs out. A connection never waits on a lookup while an
answer is known; it takes ``Name.addrs`` as they are.

A name is in one of four states (``Name.state``; shown by ``flyproxy status`` and the
metrics, which also say ``refreshing`` for a fresh name past its TTL whose refresh has not
answered yet):

- ``pending``: never answered yet. A connection to it waits for the first answer, bounded
  by its connect attempt's timeout; :meth:`Resolver.arrange` puts such targets after the
  ones with addresses, so a slow name never delays a target that can be used now.
- ``fresh``: answered, within the answer's TTL (clamped to ``[min_ttl_s, max_ttl_s]``).
- ``stale``: the TTL ran out and the refresh failed (timeout, SERVFAIL, resolver
  unreachable): the last good addresses keep serving for up to ``stale_s`` while the
  lookup is retried with a backoff; then the name is ``down``.
- ``down``: no address (NXDOMAIN, no A/AAAA record, or stale for too long). It costs no
  connect attempt and no lookup per connection: arrange() leaves it out; it is looked up
  again after ``negative_ttl_s`` (NXDOMAIN, no data) or the backoff (resolver failures).

The two families are kept apart (``Name.ips``, ``Name.until``): when the A query fails and
the AAAA query answers, the IPv4 addresses stay, with their own TTL and their own stale
time; only an answer saying there is no A record (NODATA, NXDOMAIN) removes them. Every
record of an answer is kept (see ``cares.MAX_RECORDS``).

Names in ``/etc/hosts`` are answered as getaddrinfo answers them (``localhost``, names an
operator pins there; read again at each refresh, ``max_ttl_s`` apart): a call that reads a
local file, made on the loop (no query leaves the host). Everything else goes to the
name servers of ``/etc/resolv.conf`` (read when the resolver starts).

Each worker process has its own resolver (see NOTES.md): queries per second are bounded
by names x refresh rate x workers, never by connections.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable, Iterable, Sequence

from ..settings import ServeConfig
from . import cares

log = logging.getLogger(__name__)

PENDING, FRESH, STALE, DOWN = "pending", "fresh", "stale", "down"
REFRESHING = "refreshing"  # shown for a fresh name past its TTL, its refresh still out
REFRESH_AT = 0.9  # refresh an answer when this share of its TTL has passed
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # retries after a failed lookup
HOSTS_PATH = "/etc/hosts"
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
FAMILIES = (_AF_INET6, _AF_INET)
LABELS = {_AF_INET6: "AAAA", _AF_INET: "A"}  # a family by its query, in logs and status
LOG_IPS = 8  # addresses named in one log line (a name may have thousands)


class Name:
    """One host name: its state, its addresses and who waits for its first answer."""

    __slots__ = ("host", "state", "addrs", "source", "error", "answered_at", "expires_at",
                 "ttl_s", "failures", "waiters", "timer", "by_port", "querying", "ips", "renew",
                 "until")

    def __init__(self, host: str) -> None:
        self.host = host
        self.state = PENDING
        self.addrs: tuple[tuple[int, str], ...] = ()  # (family, ip), in the order to try
        # ... made from each family's own: its last good answer, when to refresh it and
        # when it runs out (monotonic times)
        self.ips: dict[int, tuple[str, ...]] = {family: () for family in FAMILIES}
        self.renew: dict[int, float] = {family: 0.0 for family in FAMILIES}
        self.until: dict[int, float] = {family: 0.0 for family in FAMILIES}
        self.source = "dns"  # or "hosts" (/etc/hosts, as getaddrinfo reads it)
        self.error = ""  # why the last lookup failed ("" after a good one)
        self.answered_at = 0.0  # monotonic time of the last complete answer
        self.expires_at = 0.0  # when the first of the addresses held runs out
        self.ttl_s = 0.0  # ... as seen from answered_at
        self.failures = 0  # lookups failed in a row (for the backoff)
        self.waiters: list[Callable[[Name], None]] = []  # connections waiting (pending only)
        self.timer = None  # the next refresh or retry
        self.by_port: dict[int, list] = {}  # port -> [(family, sockaddr)], made once per answer
        self.querying = False

    def __repr__(self) -> str:
        return f"<Name {self.host} {self.state} addrs={len(self.addrs)} {self.error}>"

    def sockaddrs(self, port: int) -> list:
        """The addresses to try for ``port``, in order (made once per answer and port)."""
        out = self.by_port.get(port)
        if out is None:
            out = self.by_port[port] = [(family, (ip, port)) for family, ip in self.addrs]
        return out

    def describe(self, now: float) -> dict:
        return {"name": self.host, "state": self.state, "source": self.source,
                "addresses": [ip for _, ip in self.addrs],
                "age_s": round(now - self.answered_at, 1) if self.answered_at else None,
                "ttl_s": self.ttl_s, "error": self.error}


def hosts_names(path: str = HOSTS_PATH) -> frozenset[str]:
    """The names ``/etc/hosts`` gives addresses for (lower case)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return frozenset()
    names = set()
    for line in lines:
        fields = line.split("#", 1)[0].split()
        names.update(n.lower().rstrip(".") for n in fields[1:])
    return frozenset(names)


def interleave(v6: Sequence[str], v4: Sequence[str]) -> tuple[tuple[int, str], ...]:
    """IPv6 and IPv4 addresses alternating, IPv6 first (RFC 8305, section 4)."""
    out = []
    for i in range(max(len(v6), len(v4))):
        if i < len(v6):
            out.append((_AF_INET6, v6[i]))
        if i < len(v4):
            out.append((_AF_INET, v4[i]))
    return tuple(out)


class Resolver:
    """Every host name of the config in force, kept resolved (see the module doc)."""

    def __init__(self, loop, settings: ServeConfig | None = None, metrics=None,
                 hosts_path: str = HOSTS_PATH) -> None:
        self.loop = loop
        self.settings = settings or ServeConfig()
        self.metrics = metrics
        self.hosts_path = hosts_path
        self.names: dict[str, Name] = {}
        self.unsettled = 0  # names without addresses (pending or down): arrange() has work
        self._channel: cares.Channel | None = None  # made on the first name that needs DNS
        self._settled = None  # a future settle() waits on: no name pending
        self._closed = False

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for n in self.names.values():
            counts[n.state] = counts.get(n.state, 0) + 1
        return f"<Resolver names={len(self.names)} {counts} {self._channel!r}>"

    # -- the config in force -------------------------------------------------------------

    def track(self, hosts: Iterable[str]) -> None:
        """Keep exactly ``hosts`` resolved: look up names new to us, forget the others."""
        wanted = set(hosts)
        for host in list(self.names):
            if host not in wanted:
                self._forget(self.names.pop(host))
        in_hosts = None
        for host in sorted(wanted - self.names.keys()):
            name = self.names[host] = Name(host)
            if in_hosts is None:
                in_hosts = hosts_names(self.hosts_path)
            self._lookup(name, in_hosts)
        self._count()

    async def settle(self, timeout_s: float) -> int:
        """Wait (at most ``timeout_s``) until no name is pending; returns how many still are."""
        pending = sum(n.state == PENDING for n in self.names.values())
        if pending and timeout_s > 0:
            if self._settled is None or self._settled.done():
                self._settled = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._settled), timeout_s)
            except TimeoutError:
                pass
            pending = sum(n.state == PENDING for n in self.names.values())
        return pending

    def close(self) -> None:
        self._closed = True
        for name in self.names.values():
            self._forget(name)
        self.names.clear()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # -- the connection path -------------------------------------------------------------

    def arrange(self, order: Sequence) -> list:
        """``order`` (targets, best first) as a connection should try it: targets with
        addresses (and IP literals) first, names still pending after them, names that are
        down left out. Only called while some name has no addresses (``unsettled``)."""
        names = self.names
        ready, pending = [], []
        for target in order:
            if target.addrs is not None:
                ready.append(target)
                continue
            name = names.get(target.host)
            if name is None:
                continue
            if name.addrs:
                ready.append(target)
            elif name.state == PENDING:
                pending.append(target)
        ready.extend(pending)
        return ready

    # -- lookups -------------------------------------------------------------------------

    def _lookup(self, name: Name, in_hosts: frozenset[str] | None = None) -> None:
        name.timer = None
        if self._closed or name.querying:
            return
        if in_hosts is None:
            in_hosts = hosts_names(self.hosts_path)
        if name.host.lower().rstrip(".") in in_hosts:
            return self._from_hosts(name)
        if self._channel is None:
            try:
                self._channel = cares.Channel(self.loop, self.settings.dns_timeout_s,
                                              self.settings.dns_tries)
            except Exception as e:  # no python3-pycares, or c-ares cannot start
                log.error("cannot resolve host names: %s", e)
                return self._failed(name, "no resolver", negative=True)
        name.querying = True
        self._channel.lookup(name.host, lambda results: self._decided(name, results))

    def _from_hosts(self, name: Name) -> None:
        """A name in /etc/hosts: its addresses as getaddrinfo gives them (a local read)."""
        name.source = "hosts"
        try:
            infos = socket.getaddrinfo(name.host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            return self._failed(name, f"hosts: {e}", negative=True)
        addrs = []
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr[0]) not in addrs:
                addrs.append((family, sockaddr[0]))
        self._succeeded(name, tuple(addrs), self.settings.dns_max_ttl_s)

    def _succeeded(self, name: Name, addrs: tuple, ttl: float) -> None:
        """A complete answer as addresses in the order to try (getaddrinfo's, for
        /etc/hosts): each family's own are taken from it."""
        now, ttl_s = time.monotonic(), self._ttl(ttl)
        for family in FAMILIES:
            name.ips[family] = tuple(ip for f, ip in addrs if f == family)
            name.renew[family], name.until[family] = now + ttl_s * REFRESH_AT, now + ttl_s
        self._answered(name, now, addrs)

    def _decided(self, name: Name, results: dict) -> None:
        """Both queries of a lookup answered. Each family is taken on its own: records
        replace that family's addresses, an authoritative "none" (NODATA, NXDOMAIN) removes
        them, and a failed query (timeout, SERVFAIL) leaves the last good ones in place,
        for as long as the stale rules allow (:meth:`_failed`)."""
        name.querying = False
        if self._closed or self.names.get(name.host) is not name:
            return  # forgotten meanwhile
        name.source = "dns"
        now = time.monotonic()
        failed: dict[int, int] = {}  # family -> c-ares error: no answer to go by
        negative = None  # the error of an answer saying there is no such address
        for family, (records, error) in results.items():
            if error is not None and not cares.is_negative(error):
                failed[family] = error
                continue
            if error is not None and negative != cares.NXDOMAIN:
                negative = error
            ips = tuple(dict.fromkeys(record.host for record in records or ()))
            ttl_s = self._ttl(min(r.ttl for r in records)) if ips else 0.0
            name.ips[family] = ips
            name.renew[family], name.until[family] = now + ttl_s * REFRESH_AT, now + ttl_s
        if failed:
            errors = list(failed.values())
            result, reason = cares.reason(errors[0])
            if len(failed) < len(results) or len(set(errors)) > 1:  # say which family
                reason = "; ".join(f"{LABELS[f]}: {cares.reason(e)[1]}" for f, e in failed.items())
            self._lookups(result)
            return self._failed(name, reason, negative=False, families=tuple(failed))
        if any(name.ips.values()):
            self._lookups("ok")
            return self._answered(name, now)
        self._lookups("nxdomain")
        self._failed(name, cares.reason(negative)[1] if negative is not None else "no address",
                     negative=True)

    def _ttl(self, ttl: float) -> float:
        opts = self.settings
        return min(max(float(ttl), opts.dns_min_ttl_s), opts.dns_max_ttl_s)

    def _answered(self, name: Name, now: float, addrs: tuple | None = None) -> None:
        """Every family answered (records or an authoritative none): fresh, refreshed when
        the shortest TTL of what it holds is nearly over."""
        had = name.addrs
        self._use(name, interleave(name.ips[_AF_INET6], name.ips[_AF_INET])
                  if addrs is None else addrs)
        if not had:
            log.info("%s: %s (%s, ttl %gs)", name.host, _ips(name.addrs), name.source,
                     round(name.expires_at - now, 3))
        name.state, name.error, name.failures = FRESH, "", 0
        name.answered_at, name.ttl_s = now, round(name.expires_at - now, 3)
        self._schedule(name, name.ttl_s * REFRESH_AT)
        self._settle(name)

    def _use(self, name: Name, addrs: tuple) -> None:
        """``addrs`` are the name's addresses from now on (for new connections)."""
        if name.addrs and addrs and addrs != name.addrs:
            log.info("%s: addresses changed: %s -> %s (new connections use the new ones)",
                     name.host, _ips(name.addrs), _ips(addrs))
        if addrs != name.addrs:
            name.addrs, name.by_port = addrs, {}
        held = [name.until[f] for f in FAMILIES if name.ips[f]]
        name.expires_at = min(held) if held else 0.0

    def _failed(self, name: Name, reason: str, *, negative: bool,
                families: tuple[int, ...] = FAMILIES) -> None:
        """No (complete) answer this time. ``negative``: the answer says there is no
        address (NXDOMAIN, no record of either family): down now, asked again after
        negative_ttl_s. Otherwise the resolver failed for ``families``: a family's last
        good addresses serve until stale_s past their expiry, retried with a backoff; the
        name is down once no family has any."""
        now = time.monotonic()
        first = name.error != reason
        name.error = reason
        name.failures += 1
        if negative:
            for family in FAMILIES:
                name.ips[family] = ()
        else:
            self._drop_expired(name, now, reason)
        if not any(name.ips.values()):
            if name.addrs or name.state != DOWN:
                log.warning("%s: down (%s)%s", name.host, reason,
                            f"; stopped using {_ips(name.addrs)}" if name.addrs else "")
            name.state = DOWN
            self._use(name, ())
            delay = self.settings.dns_negative_ttl_s if negative else self._backoff(name)
        else:
            had = name.addrs
            self._use(name, interleave(name.ips[_AF_INET6], name.ips[_AF_INET]))
            if not had:  # a first answer, from one family (the other failed)
                name.answered_at = now
                name.ttl_s = round(name.expires_at - now, 3)
                log.info("%s: %s (dns, ttl %gs)", name.host, _ips(name.addrs), name.ttl_s)
            name.state = STALE if now >= name.expires_at else FRESH
            stale_s = self.settings.dns_stale_s
            kept = [f for f in families if name.ips[f]]
            if first and kept:
                log.warning("%s: lookup failed (%s); still using %s for up to %gs", name.host,
                            reason, _ips([ip for f in kept for ip in name.ips[f]]),
                            round(max(name.until[f] for f in kept) + stale_s - now, 1))
            elif first:
                log.warning("%s: lookup failed (%s)", name.host, reason)
            # retry soon, and look again when an answer is due for its refresh, runs out,
            # or its stale time is over
            deadline = min(name.renew[f] if now < name.renew[f] else u if now < u else
                           u + stale_s for f, u in name.until.items() if name.ips[f])
            delay = max(0.0, min(self._backoff(name), deadline - now))
        self._schedule(name, delay)
        self._settle(name)

    def _drop_expired(self, name: Name, now: float, reason: str) -> None:
        """Forget each family whose answer ran out more than stale_s ago (while another
        family still has addresses: else the name goes down, logged as such)."""
        stale_s = self.settings.dns_stale_s
        gone = [f for f in FAMILIES if name.ips[f] and now >= name.until[f] + stale_s]
        if gone and len(gone) < sum(bool(ips) for ips in name.ips.values()):
            for family in gone:
                log.warning("%s: %s addresses down (%s); stopped using %s", name.host,
                            LABELS[family], reason, _ips(name.ips[family]))
        for family in gone:
            name.ips[family] = ()

    def _backoff(self, name: Name) -> float:
        return BACKOFF_S[min(name.failures, len(BACKOFF_S)) - 1]

    def _schedule(self, name: Name, delay_s: float) -> None:
        if name.timer is not None:
            name.timer.cancel()
        name.timer = self.loop.call_later(delay_s, self._refresh, name)

    def _refresh(self, name: Name) -> None:
        """A name's timer: mark an expired answer stale (or down), then look it up again."""
        name.timer = None
        now = time.monotonic()
        if name.addrs and now >= name.expires_at:
            if now >= name.expires_at + self.settings.dns_stale_s:
                return self._failed(name, name.error or "expired", negative=False)
            if name.state == FRESH and name.error:
                name.state = STALE
        self._lookup(name)

    def _settle(self, name: Name) -> None:
        """``name`` has been decided: wake the connections waiting for it, recount."""
        waiters, name.waiters = name.waiters, []
        for wake in waiters:
            wake(name)
        self._count()

    def _count(self) -> None:
        names = self.names.values()
        self.unsettled = sum(not n.addrs for n in names)
        settled = self._settled
        if settled is not None and not settled.done() and \
                not any(n.state == PENDING for n in names):
            settled.set_result(None)

    def _forget(self, name: Name) -> None:
        if name.timer is not None:
            name.timer.cancel()
            name.timer = None
        name.state = DOWN
        name.error = "removed from the config"
        self._settle(name)

    def _lookups(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.dns_lookup(result)

    # -- observability -------------------------------------------------------------------

    def status(self) -> list[dict]:
        now = time.monotonic()
        rows = []
        for name in self.names.values():
            row = name.describe(now)
            if name.state == FRESH and name.addrs and now >= name.expires_at:
                # past its TTL: stale once a refresh failed, refreshing while one is out
                row["state"] = STALE if name.error else REFRESHING
            rows.append(row)
        return rows


def _ips(addrs: Sequence) -> str:
    """Addresses ((family, ip) or ip) for a log line: the first LOG_IPS, then a count."""
    ips = [a if isinstance(a, str) else a[1] for a in addrs[:LOG_IPS]]
    more = f" and {len(addrs) - LOG_IPS} more" if len(addrs) > LOG_IPS else ""
    return ", ".join(ips) + more if ips else "none"
