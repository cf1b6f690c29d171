"""PROXY protocol headers (HAProxy's proxy-protocol.txt), sent first on a backend
connection so the backend sees the client's address and the address it dialled.

v1 is one text line (``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n``); v2 is binary: the
12-byte signature, version 2 with the PROXY command, the family (TCP over IPv4 or IPv6),
the length of the addresses, then the addresses and ports in network byte order. A v4
client on a dual-stack listener (``::ffff:a.b.c.d``) is written as IPv4. Addresses of
different families (not seen from one TCP connection) are sent as v1 ``UNKNOWN`` / v2
``AF_UNSPEC``, which a receiver takes as "use the connection's own addresses".

A connection the proxy makes on its own behalf (a health check) carries :func:`local`: the
v2 LOCAL command or the v1 ``UNKNOWN`` line, which the spec asks for on health checks, so
the receiver accepts the connection as it is instead of logging a missing header.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PROXY, V2_LOCAL = 0x21, 0x20  # version 2, command PROXY / LOCAL
V2_TCP4, V2_TCP6, V2_UNSPEC = 0x11, 0x21, 0x00


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope is not sent
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def header(version: str, client: tuple, local: tuple) -> bytes:
    """The header for a connection from ``client`` to ``local`` (socket addresses, as
    accept() and getsockname() give them)."""
    src, dst = _ip(client[0]), _ip(local[0])
    sport, dport = client[1], local[1]
    if version == "v1":
        if src.version != dst.version:
            return b"PROXY UNKNOWN\r\n"
        return f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()
    if src.version != dst.version:
        return SIGNATURE + struct.pack("!BBH", V2_PROXY, V2_UNSPEC, 0)
    family = V2_TCP4 if src.version == 4 else V2_TCP6
    addresses = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return SIGNATURE + struct.pack("!BBH", V2_PROXY, family, len(addresses)) + addresses


def local(version: str) -> bytes:
    """The header of a connection that relays no client (a health check): no addresses,
    the receiver uses the connection's own."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return SIGNATURE + struct.pack("!BBH", V2_LOCAL, V2_UNSPEC, 0)
