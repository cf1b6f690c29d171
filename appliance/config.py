"""Load, validate and compare flyproxy configurations.

The one road a config value travels: ``load(path)`` reads the file, parses JSON
(naming line and column on a syntax error), validates it against the JSON
Schema shipped beside this module, then runs the checks a schema cannot express
(a port claimed twice, duplicate app names, targets that are not ``host:port``).
Every problem found is collected, so one run of ``flyproxy check`` reports all
of them, each as ``FILE: Apps[1].Ports[0]: what is wrong``.

The result is an immutable :class:`Config`; :func:`diff` compares two of them
for a reload.
"""

from __future__ import annotations

import dataclasses
import decimal
import hashlib
import ipaddress
import json
import os
import re
import socket
import stat
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema

__all__ = ["App", "Config", "ConfigDiff", "ConfigError", "HealthCheck", "Target", "diff", "load",
           "loads"]

# An RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
MAX_BYTES = 1 << 20  # a config file larger than this is refused (10,000 ports take ~60 KB)
MAX_DEPTH = 16  # JSON nesting; the format itself needs 4
MAX_ERRORS = 50  # errors reported in full; the rest are counted
QUOTE_CHARS = 60  # user input quoted in a message is cut to this


def quote(value: Any) -> str:
    """``repr(value)``, cut to QUOTE_CHARS: a message never carries a huge input back."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + f"... ({len(text)} chars)"


class _Real(decimal.Decimal):
    """A JSON number written with a fraction or an exponent (``7401.0``, ``5.001e3``): kept
    apart from integers, so JSON Schema's "integer" refuses it (it counts 7401.0 as one)."""

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text  # as written, for messages
        return number

    def __repr__(self) -> str:
        return self.text


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: Iterable[str]):
        self.source = source
        self.errors = list(errors)
        super().__init__("\n".join(f"{source}: {e}" for e in self.errors))


@dataclasses.dataclass(frozen=True, order=True)
class Target:
    """A backend address: a host name or IP literal and a TCP port."""

    host: str
    port: int
    # An IP literal's ((family, sockaddr),), worked out once here rather than per
    # connection; None for a host name, which is resolved at each connect.
    addrs: tuple | None = dataclasses.field(init=False, compare=False, repr=False)
    label: str = dataclasses.field(init=False, compare=False, repr=False)  # str(), made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", f"[{self.host}]:{self.port}" if ":" in self.host
                           else f"{self.host}:{self.port}")
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):
            addrs = None
        else:
            addrs = tuple((family, sockaddr) for family, _, _, _, sockaddr in infos)
        object.__setattr__(self, "addrs", addrs)

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str) -> Target:
        """Parse ``host:port``, ``ip:port`` or ``[ipv6]:port``; raise ValueError saying why not."""
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError("not [ipv6]:port")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{quote(host)} is not an IPv6 address") from None
        else:
            host, sep, port = text.rpartition(":")
            if not sep or not host:
                raise ValueError("not host:port")
            if ":" in host:
                raise ValueError("an IPv6 address needs [brackets], as in [::1]:80")
            if not _HOSTNAME.match(host):
                raise ValueError(f"{quote(host)} is not a valid host name or IPv4 address")
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ValueError(f"port {quote(port)} is not a number from 1 to 65535")
        return cls(host, int(port))


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    """An app's optional "HealthCheck": a TCP connect to each target every ``interval_s``,
    bounded by ``timeout_s``; ``fall`` failures in a row take it down, ``rise`` successes
    bring it back."""

    interval_s: float = 2.0
    timeout_s: float = 1.0
    rise: int = 2
    fall: int = 3

    @classmethod
    def parse(cls, doc: dict) -> HealthCheck:
        d = cls()
        return cls(float(doc.get("Interval", d.interval_s)), float(doc.get("Timeout", d.timeout_s)),
                   int(doc.get("Rise", d.rise)), int(doc.get("Fall", d.fall)))


@dataclasses.dataclass(frozen=True)
class App:
    name: str
    ports: tuple[int, ...]
    targets: tuple[Target, ...]
    # our extensions, each an optional per-app key:
    max_connections: int | None = None  # "MaxConnections"
    proxy_protocol: str | None = None  # "ProxyProtocol": "v1" or "v2"
    balance: str = "random"  # "Balance": "random" or "least-connections"
    health_check: HealthCheck | None = None  # "HealthCheck"

    def options(self) -> str:
        """The extensions this app uses, as `flyproxy check` prints them ("" for none)."""
        parts = []
        if self.max_connections is not None:
            parts.append(f"MaxConnections {self.max_connections}")
        if self.proxy_protocol:
            parts.append(f"ProxyProtocol {self.proxy_protocol}")
        if self.balance != "random":
            parts.append(f"Balance {self.balance}")
        if self.health_check:
            h = self.health_check
            parts.append(f"HealthCheck every {h.interval_s:g}s (timeout {h.timeout_s:g}s, "
                         f"rise {h.rise}, fall {h.fall})")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated configuration. ``digest`` identifies the exact bytes it came from, ``raw``."""

    apps: tuple[App, ...]
    source: str = "<config>"
    digest: str = ""
    raw: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @property
    def routes(self) -> dict[int, App]:
        """Listening port -> the app it belongs to."""
        return {port: app for app in self.apps for port in app.ports}

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(p for app in self.apps for p in app.ports)

    @property
    def names(self) -> frozenset[str]:
        """The host names among the targets (IP literals need no resolving)."""
        return frozenset(t.host for app in self.apps for t in app.targets if t.addrs is None)

    def summary(self) -> str:
        targets = sum(len(a.targets) for a in self.apps)
        from .logs import count
        return ", ".join((count(len(self.apps), "app"), count(len(self.ports), "port"),
                          count(targets, "target")))


@dataclasses.dataclass(frozen=True)
class ConfigDiff:
    """What a reload from ``old`` to ``new`` changes."""

    added_ports: frozenset[int]
    removed_ports: frozenset[int]
    moved_ports: frozenset[int]  # kept, but now belong to another app
    retargeted_apps: tuple[str, ...]  # same name, different targets
    reoptioned_apps: tuple[str, ...] = ()  # same name, other options (ProxyProtocol, ...)

    def __bool__(self) -> bool:
        return bool(self.added_ports or self.removed_ports or self.moved_ports or
                    self.retargeted_apps or self.reoptioned_apps)

    def __str__(self) -> str:
        if not self:
            return "no changes"
        parts = []
        for label, ports in (("added", self.added_ports), ("removed", self.removed_ports),
                             ("moved", self.moved_ports)):
            if ports:
                parts.append(f"ports {label}: {_port_list(ports)}")
        if self.retargeted_apps:
            parts.append("targets changed: " + ", ".join(self.retargeted_apps))
        if self.reoptioned_apps:
            parts.append("options changed: " + ", ".join(self.reoptioned_apps))
        return "; ".join(parts)


def _port_list(ports: Iterable[int], limit: int = 10) -> str:
    ports = sorted(ports)
    text = ", ".join(map(str, ports[:limit]))
    return text + (f" and {len(ports) - limit} more" if len(ports) > limit else "")


def diff(old: Config, new: Config) -> ConfigDiff:
    old_routes, new_routes = old.routes, new.routes
    kept = old_routes.keys() & new_routes.keys()
    old_apps = {a.name: a for a in old.apps}
    return ConfigDiff(
        added_ports=frozenset(new_routes.keys() - old_routes.keys()),
        removed_ports=frozenset(old_routes.keys() - new_routes.keys()),
        moved_ports=frozenset(p for p in kept if old_routes[p].name != new_routes[p].name),
        retargeted_apps=tuple(a.name for a in new.apps
                              if a.name in old_apps and old_apps[a.name].targets != a.targets),
        reoptioned_apps=tuple(a.name for a in new.apps if a.name in old_apps and
                              _options(old_apps[a.name]) != _options(a)),
    )


def _options(app: App) -> tuple:
    return (app.max_connections, app.proxy_protocol, app.balance, app.health_check)


def json_path(parts: Iterable[Any]) -> str:
    """``["Apps", 1, "Ports", 0]`` -> ``Apps[1].Ports[0]``."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@cache
def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("config.schema.json").read_text())


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def load(path: str | Path) -> Config:
    """Read and validate the config file at ``path``; raise ConfigError naming every problem.

    Only a regular file of at most MAX_BYTES is read (a FIFO, a device or a huge file is
    refused before a byte is read), so a load is bounded in time and memory."""
    return loads(read(path), str(path))


def read(path: str | Path) -> bytes:
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait
    except OSError as e:
        raise ConfigError(source, [f"cannot read: {e.strerror}"]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(source, ["not a regular file"])
        if info.st_size > MAX_BYTES:
            raise ConfigError(source, [f"is {info.st_size:,} bytes; a config may have at "
                                       f"most {MAX_BYTES:,}"])
        chunks, size = [], 0
        while chunk := os.read(fd, MAX_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:  # it grew while we read
                raise ConfigError(source, [f"has more than {MAX_BYTES:,} bytes"])
        return b"".join(chunks)
    except OSError as e:
        raise ConfigError(source, [f"cannot read: {e.strerror}"]) from None
    finally:
        os.close(fd)


def loads(data: bytes | str, source: str = "<config>") -> Config:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        raise ConfigError(source, [f"is {len(raw):,} bytes; a config may have at most "
                                   f"{MAX_BYTES:,}"])
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys,
                         parse_float=_Real, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not UTF-8 text (byte {e.start})"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError(source, [f"line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"]) from None
    except ValueError as e:  # duplicate key
        raise ConfigError(source, [f"invalid JSON: {e}"]) from None
    except RecursionError:
        raise ConfigError(source, ["invalid JSON: nested too deeply"]) from None
    depth = _depth(doc)
    if depth > MAX_DEPTH:
        raise ConfigError(source, [f"nested {depth} levels deep; at most {MAX_DEPTH}"])

    validator = jsonschema.Draft202012Validator(schema())
    problems = [(list(e.absolute_path), _message(e)) for e in validator.iter_errors(doc)]
    problems += _semantic_problems(doc)
    if problems:
        problems.sort(key=lambda p: [(0, x) if isinstance(x, int) else (1, x) for x in p[0]])
        lines = [f"{json_path(path)}: {message}" for path, message in problems[:MAX_ERRORS]]
        if len(problems) > MAX_ERRORS:
            lines.append(f"(and {len(problems) - MAX_ERRORS} more problems)")
        raise ConfigError(source, lines)
    apps = tuple(App(a["Name"], tuple(int(p) for p in a["Ports"]),
                     tuple(Target.parse(t) for t in a["Targets"]), a.get("MaxConnections"),
                     a.get("ProxyProtocol"), a.get("Balance", "random"),
                     HealthCheck.parse(a["HealthCheck"]) if "HealthCheck" in a else None)
                 for a in doc["Apps"])
    return Config(apps, source, hashlib.sha256(raw).hexdigest(), raw)


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator == "minItems" and error.validator_value == 1:
        return "is empty; list at least one"
    if error.validator == "pattern" and error.schema.get("description"):
        return f"{quote(error.instance)}: {error.schema['description']}"
    if error.validator in ("type", "minimum", "maximum", "exclusiveMinimum", "maxLength",
                           "minLength", "enum",
                           "additionalProperties", "required"):
        return error.message if len(error.message) <= 2 * QUOTE_CHARS else \
            f"{quote(error.instance)}: fails {error.validator} {error.validator_value!r}"
    return error.message[:2 * QUOTE_CHARS]


def _depth(doc: Any) -> int:
    """How deeply lists and objects nest in ``doc`` (iteratively: no recursion limit)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in
                         (node.values() if isinstance(node, dict) else node))
    return deepest


def _semantic_problems(doc: Any) -> list[tuple[list, str]]:
    """What the schema cannot say. Tolerates a doc that failed the schema: it checks
    whatever parts are well-formed, so one run reports every problem."""
    apps = doc.get("Apps") if isinstance(doc, dict) else None
    if not isinstance(apps, list):
        return []
    problems: list[tuple[list, str]] = []
    names: dict[str, int] = {}
    owners: dict[int, str] = {}
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            continue
        name = app.get("Name")
        if isinstance(name, str):
            if name in names:
                problems.append((["Apps", i, "Name"],
                                 f"{quote(name)} is already the name of Apps[{names[name]}]"))
            names.setdefault(name, i)
        ports = app.get("Ports")
        for j, port in enumerate(ports if isinstance(ports, list) else []):
            if not isinstance(port, int) or isinstance(port, bool):
                continue
            if port in owners:
                problems.append((["Apps", i, "Ports", j],
                                 f"port {port} is already used by {owners[port]}"))
            else:
                owners[port] = f"Apps[{i}] ({quote(name)})"
        targets = app.get("Targets")
        seen: dict[Target, int] = {}
        for j, text in enumerate(targets if isinstance(targets, list) else []):
            if not isinstance(text, str):
                continue
            try:
                target = Target.parse(text)
            except ValueError as e:
                problems.append((["Apps", i, "Targets", j], f"{quote(text)}: {e}"))
                continue
            if target in seen:
                problems.append((["Apps", i, "Targets", j],
                                 f"{quote(text)} is already listed as Targets[{seen[target]}]"))
            seen.setdefault(target, j)
    return problems
