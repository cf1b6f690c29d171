"""A small authoritative DNS server for tests: real UDP and TCP on port 53, real DNS
messages (built and parsed by dnspython), answers the tests set and change while it runs.

It answers A and AAAA from ``records``; a name it does not know is NXDOMAIN, a known name
without a record of the type asked is NODATA (NOERROR, empty answer). An answer too big
for a UDP reply (512 bytes: no EDNS) goes out truncated (TC set, no records), as a real
server's does, and whole over TCP. Per name a test can delay the answer (``delay_s``: the
reply is sent later from a timer, so other names are answered meanwhile) or answer
SERVFAIL (``servfail``); per (name, type) it can answer SERVFAIL or not at all
(``broken``); or the whole server can stop answering (``silent``: queries are read and
dropped, as by a resolver that is down). Records go out in the order the test set them.
``queries`` counts what was asked, per (name, type).
"""

from __future__ import annotations

import collections
import socket
import struct
import threading

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

UDP_MAX = 512  # bytes: a reply without EDNS (RFC 1035, section 4.2.1)


class DnsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 53, namespace=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if namespace is not None:
            with namespace():  # the sockets live in that network namespace
                self.sock = socket.socket(family, socket.SOCK_DGRAM)
                self.tcp = socket.socket(family, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.tcp = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, self.port))
        self.tcp.listen(16)
        self.records: dict[str, list[tuple[str, str, int]]] = {}  # name -> [(type, value, ttl)]
        self.delay_s: dict[str, float] = {}
        self.servfail: set[str] = set()
        self.broken: dict[tuple[str, str], str] = {}  # (name, "A") -> "servfail" or "silent"
        self.silent = False
        self.queries: collections.Counter = collections.Counter()  # (name, "A"/"AAAA") -> n
        self.tcp_queries = 0
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.tcp_thread = threading.Thread(target=self._serve_tcp, daemon=True)
        self.tcp_thread.start()

    def set(self, name: str, *records: tuple[str, str, int]) -> None:
        """Answer ``name`` with ``records`` ((type, value, ttl), ...) from now on."""
        with self._lock:
            self.records[name.lower().rstrip(".")] = list(records)

    def asked(self, name: str, qtype: str | None = None) -> int:
        with self._lock:
            return sum(n for (q, t), n in self.queries.items()
                       if q == name and qtype in (None, t))

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self._answer(data, lambda wire, addr=addr: self._send(wire, addr), UDP_MAX)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_connection, args=(conn,), daemon=True).start()

    def _tcp_connection(self, conn: socket.socket) -> None:
        """Length-prefixed queries (RFC 1035, section 4.2.2) until the client closes."""
        conn.settimeout(10)
        send_lock = threading.Lock()

        def send(wire: bytes) -> None:
            with send_lock:
                try:
                    conn.sendall(struct.pack("!H", len(wire)) + wire)
                except OSError:
                    pass

        with conn:
            while not self._stopped.is_set():
                try:
                    head = _recv_exactly(conn, 2)
                    data = _recv_exactly(conn, struct.unpack("!H", head)[0]) if head else b""
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.tcp_queries += 1
                self._answer(data, send, 65535)

    def _answer(self, data: bytes, send, max_size: int) -> None:
        try:
            query = dns.message.from_wire(data)
        except Exception:
            return
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        qtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries[(name, qtype)] += 1
            broken = self.broken.get((name, qtype))
            if self.silent or broken == "silent":
                return
            reply = self._reply(query, name, qtype, broken == "servfail", max_size)
            delay = self.delay_s.get(name, 0)
        if delay:
            timer = threading.Timer(delay, send, (reply,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        else:
            send(reply)

    def _reply(self, query, name: str, qtype: str, servfail: bool, max_size: int) -> bytes:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if servfail or name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        else:
            values = [(ttl, value) for rtype, value, ttl in self.records[name] if rtype == qtype]
            if values:  # one RRset, in the order the test set them
                reply.answer.append(dns.rrset.from_text_list(
                    query.question[0].name, min(t for t, _ in values), "IN", qtype,
                    [v for _, v in values]))
        try:  # records in the order set (dnspython would shuffle them): tests choose it
            return reply.to_wire(max_size=max_size, want_shuffle=False)
        except dns.exception.TooBig:  # too big for UDP: truncated, the client asks over TCP
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA | dns.flags.TC
            return reply.to_wire()

    def _send(self, wire: bytes, addr) -> None:
        try:
            self.sock.sendto(wire, addr)
        except OSError:
            pass

    def stop(self) -> None:
        self._stopped.set()
        for timer in self._timers:
            timer.cancel()
        self.thread.join(5)
        self.tcp_thread.join(5)
        self.sock.close()
        self.tcp.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or b'' if the peer closed first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf
