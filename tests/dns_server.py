"""A small authoritative DNS server for tests: real UDP on port 53, real DNS messages
(built and parsed by dnspython), answers the tests set and change while it runs.

It answers A and AAAA from ``records``; a name it does not know is NXDOMAIN. Per name a
test can delay the answer (``delay_s``: the reply is sent later from a timer, so other
names are answered meanwhile), answer SERVFAIL (``servfail``), or the whole server can
stop answering (``silent``: queries are read and dropped, as by a resolver that is down).
``queries`` counts what was asked, per (name, type).
"""

from __future__ import annotations

import collections
import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 53, namespace=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if namespace is not None:
            with namespace():  # the socket lives in that network namespace
                self.sock = socket.socket(family, socket.SOCK_DGRAM)
        else:
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.records: dict[str, list[tuple[str, str, int]]] = {}  # name -> [(type, value, ttl)]
        self.delay_s: dict[str, float] = {}
        self.servfail: set[str] = set()
        self.silent = False
        self.queries: collections.Counter = collections.Counter()  # (name, "A"/"AAAA") -> n
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def set(self, name: str, *records: tuple[str, str, int]) -> None:
        """Answer ``name`` with ``records`` ((type, value, ttl), ...) from now on."""
        with self._lock:
            self.records[name.lower().rstrip(".")] = list(records)

    def asked(self, name: str) -> int:
        with self._lock:
            return sum(n for (q, _), n in self.queries.items() if q == name)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            question = query.question[0]
            name = question.name.to_text().lower().rstrip(".")
            qtype = dns.rdatatype.to_text(question.rdtype)
            with self._lock:
                self.queries[(name, qtype)] += 1
                if self.silent:
                    continue
                reply = self._reply(query, name, qtype)
                delay = self.delay_s.get(name, 0)
            if delay:
                timer = threading.Timer(delay, self._send, (reply, addr))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
            else:
                self._send(reply, addr)

    def _reply(self, query, name: str, qtype: str):
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if name in self.servfail:
            reply.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.records:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        else:
            for rtype, value, ttl in self.records[name]:
                if rtype == qtype:
                    reply.answer.append(dns.rrset.from_text(query.question[0].name, ttl,
                                                            "IN", rtype, value))
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
        self.sock.close()
