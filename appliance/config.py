"""Load, validate and compare flyproxy configurations.

The one road a config value travels: ``load(path)`` reads the file, parses JSON
(a UTF-8 byte order mark is ignored, as RFC 8259 section 8.1 allows), validates it
against the JSON Schema shipped beside this module, then runs the checks a schema cannot
express (a port claimed twice, duplicate app names, targets that are not ``host:port``).
Every problem found is collected, so one run of ``flyproxy check`` reports all of them,
one line each, in the order they appear in the file, where they start in it:
``FILE:12:9: Apps[1].Ports[0]: must be from 1 to 65535, not 0`` (``jsontext`` finds the
place, only when there is a problem to place). The wording is ours, not jsonschema's: the
table in ``tests/test_config.py`` shows every message the schema can give.

The result is an immutable :class:`Config`; :func:`diff` compares two of them
for a reload.
"""

from __future__ import annotations

import dataclasses
import functools
import decimal
import difflib
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

from .jsontext import Text, describe, explain, name, quote, reject_constant

__all__ = ["App", "Config", "ConfigDiff", "ConfigError", "HealthCheck", "Target", "diff", "load",
           "loads"]

# An RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
MAX_BYTES = 1 << 20  # a config file larger than this is refused (10,000 ports take ~60 KB)
MAX_DEPTH = 16  # JSON nesting; the format itself needs 4
MAX_ERRORS = 50  # errors reported in full; the rest are counted


class _Real(decimal.Decimal):
    """A JSON number written with a fraction or an exponent (``7401.0``, ``5.001e3``): kept
    apart from integers, so JSON Schema's "integer" refuses it (it counts 7401.0 as one)."""

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text  # as written, for messages
        return number

    def __repr__(self) -> str:
        return self.text


_PLACE = re.compile(r"(\d+:\d+): ")


def in_file(source: str, problem: str, kind: str = "") -> str:
    """``12:9: Apps: ...`` -> ``FILE:12:9: Apps: ...`` (or ``FILE:12:9: warning: Apps: ...``);
    a problem with no place -> ``FILE: ...``."""
    match = _PLACE.match(problem)
    place, rest = (":" + match[1], problem[match.end():]) if match else ("", problem)
    return f"{source}{place}: {kind + ': ' if kind else ''}{rest}"


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one line per problem, each starting
    with its ``line:column: `` when it has a place in the file; ``str()`` is those lines,
    each naming the file (:func:`in_file`)."""

    def __init__(self, source: str, errors: Iterable[str]):
        self.source = source
        self.errors = list(errors)
        super().__init__("\n".join(in_file(source, e) for e in self.errors))


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
        digits = port.isascii() and port.isdigit()
        if not digits or not 1 <= int(port) <= 65535:
            shown = port if digits and len(port) < 20 else quote(port)
            raise ValueError(f"port {shown} is not a number from 1 to 65535")
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
    max_per_client: int | None = None  # "MaxConnectionsPerClient"
    rate_per_client: float | None = None  # "MaxConnectionRatePerClient", connections/s
    rate: float | None = None  # "MaxConnectionRate", connections/s
    bytes_per_second: int | None = None  # "BytesPerSecond", per connection and direction
    drain_timeout_s: float | None = None  # "DrainTimeout"

    @functools.cached_property  # (asked for every connection: computed once)
    def limited(self) -> bool:
        """Does a new connection to this app have a limit to pass (limits.py)?"""
        return (self.max_connections is not None or self.max_per_client is not None or
                self.rate_per_client is not None or self.rate is not None)

    @functools.cached_property
    def per_client(self) -> bool:
        return self.max_per_client is not None or self.rate_per_client is not None

    def options(self) -> str:
        """The extensions this app uses, as `flyproxy check` prints them ("" for none)."""
        parts = []
        if self.max_connections is not None:
            parts.append(f"MaxConnections {self.max_connections}")
        if self.max_per_client is not None:
            parts.append(f"MaxConnectionsPerClient {self.max_per_client}")
        if self.rate_per_client is not None:
            parts.append(f"MaxConnectionRatePerClient {self.rate_per_client:g}/s")
        if self.rate is not None:
            parts.append(f"MaxConnectionRate {self.rate:g}/s")
        if self.bytes_per_second is not None:
            parts.append(f"BytesPerSecond {self.bytes_per_second}")
        if self.drain_timeout_s is not None:
            parts.append(f"DrainTimeout {self.drain_timeout_s:g}s")
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
    # valid, but probably not meant (an empty Apps); formatted as ConfigError.errors are
    warnings: tuple[str, ...] = dataclasses.field(default=(), compare=False)

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
    return (app.max_connections, app.proxy_protocol, app.balance, app.health_check,
            app.max_per_client, app.rate_per_client, app.rate, app.bytes_per_second,
            app.drain_timeout_s)


def json_path(parts: Iterable[Any]) -> str:
    """``["Apps", 1, "Ports", 0]`` -> ``Apps[1].Ports[0]`` (a long key is cut)."""
    out = ""
    for part in parts:
        if not isinstance(part, int):
            part = part if len(part) <= 40 and part.isprintable() else name(part, 40)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(source, [_not_utf8(raw, e.start)]) from None
    text = text.removeprefix("\ufeff")  # a byte order mark: Windows editors write one
    try:
        doc = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_float=_Real,
                         parse_constant=reject_constant)
        refused = _depth(doc) > MAX_DEPTH
    except json.JSONDecodeError as e:
        raise ConfigError(source, [f"{e.lineno}:{e.colno}: invalid JSON: {explain(text, e)}"]) \
            from None
    except (ValueError, RecursionError):  # a duplicate key, NaN, too deep for json itself
        refused = True
    if refused:  # find the first such place, and say where it is
        where = Text(text)
        fault = where.first_fault(MAX_DEPTH)
        if fault is None:  # pragma: no cover (json refused what the walk accepts)
            raise ConfigError(source, ["invalid JSON"])
        offset, path, message = fault
        raise ConfigError(source, [f"{where.place(offset)}: {json_path(path)}: {message}"])

    validator = jsonschema.Draft202012Validator(schema())
    problems = _schema_problems(validator.iter_errors(doc)) + _semantic_problems(doc)
    warnings = [(("Apps",), None, "is empty: the proxy would listen on no port")] \
        if isinstance(doc, dict) and doc.get("Apps") == [] else []
    if problems:
        raise ConfigError(source, _placed(text, problems))
    apps = tuple(App(a["Name"], tuple(int(p) for p in a["Ports"]),
                     tuple(Target.parse(t) for t in a["Targets"]), a.get("MaxConnections"),
                     a.get("ProxyProtocol"), a.get("Balance", "random"),
                     HealthCheck.parse(a["HealthCheck"]) if "HealthCheck" in a else None,
                     a.get("MaxConnectionsPerClient"), _number(a.get("MaxConnectionRatePerClient")),
                     _number(a.get("MaxConnectionRate")), a.get("BytesPerSecond"),
                     _number(a.get("DrainTimeout")))
                 for a in doc["Apps"])
    return Config(apps, source, hashlib.sha256(raw).hexdigest(), raw,
                  tuple(_placed(text, warnings)))


def _number(value) -> float | None:
    return None if value is None else float(value)


# A problem: (JSON path of the node, the key it is about or None, message)
Problem = tuple[tuple, "str | None", str]


def _placed(text: str, problems: list[Problem]) -> list[str]:
    """``line:col: path: message`` per problem, one per node (or key), in the file's order;
    after MAX_ERRORS of them, how many more."""
    unique: dict[tuple, Problem] = {}
    for path, key, message in problems:  # the first found for a node is the one that counts
        unique.setdefault((path, key), (path, key, message))
    where = Text(text)
    found = where.locate(path + (key,) if key is not None else path for path, key in unique)
    located = []
    for path, key, message in unique.values():
        offsets = found.get(path + (key,) if key is not None else path)
        located.append((offsets[0 if key is not None else 1] if offsets else None, path, message))
    located.sort(key=lambda p: (p[0] is None, p[0] or 0))  # (none is left unplaced in practice)
    lines = [(f"{where.place(offset)}: " if offset is not None else "") +
             f"{json_path(path)}: {message}" for offset, path, message in located[:MAX_ERRORS]]
    if len(located) > MAX_ERRORS:
        lines.append(f"(and {len(located) - MAX_ERRORS} more problems)")
    return lines


def _not_utf8(raw: bytes, at: int) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "1:1: is UTF-16 text (it starts with a UTF-16 byte order mark); save it as UTF-8"
    line_start = raw.rfind(b"\n", 0, at) + 1
    column = len(raw[line_start:at].decode("utf-8")) + 1  # valid up to the bad byte
    line = raw.count(b"\n", 0, at) + 1
    return f"{line}:{column}: not UTF-8 text (byte 0x{raw[at]:02x}); save it as UTF-8"


# What each JSON Schema type is called in a message
_KINDS = {"object": "an object {...}", "array": "a list [...]", "string": "a string",
          "integer": "a whole number", "number": "a number", "boolean": "true or false",
          "null": "null"}


def _schema_problems(errors: Iterable[jsonschema.ValidationError]) -> list[Problem]:
    problems: list[Problem] = []
    objects: dict[tuple, jsonschema.ValidationError] = {}  # their keys are checked once, below
    for error in errors:
        path = tuple(error.absolute_path)
        if error.validator in ("required", "additionalProperties"):
            objects.setdefault(path, error)
        else:
            problems.append((path, None, _message(error)))
    for path, error in objects.items():
        problems += _key_problems(path, error.instance, error.schema)
    return problems


def _key_problems(path: tuple, obj: dict, schema: dict) -> list[Problem]:
    """An unknown key (with a guess at the known one meant) and the required keys missing,
    as one problem each: a misspelt required key is one mistake, not two."""
    known = list(schema.get("properties", {}))
    missing = [k for k in schema.get("required", ()) if k not in obj]
    free = [k for k in known if k not in obj]
    problems: list[Problem] = []
    for key in obj if schema.get("additionalProperties") is False else ():
        if key in known:
            continue
        guess = _guess(key, free) if len(problems) < MAX_ERRORS else None  # the rest: counted
        if guess:
            free.remove(guess)
            if guess in missing:
                missing.remove(guess)
            problems.append((path, key, f"unknown key {name(key)}; did you mean {name(guess)}?"))
        else:
            problems.append((path, key, f"unknown key {name(key)}; the keys here are "
                                        + ", ".join(known)))
    if missing:
        names = [name(k) for k in missing]
        problems.append((path, None, f"missing required key {names[0]}" if len(names) == 1 else
                         f"missing required keys {', '.join(names[:-1])} and {names[-1]}"))
    return problems


def _guess(key: str, candidates: list[str]) -> str | None:
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(key[:100].lower(), by_lower, n=1)
    return by_lower[close[0]] if close else None


def _message(error: jsonschema.ValidationError) -> str:
    """One schema failure of a value, in words: what it must be, and what it is."""
    check, value, rule, node = error.validator, error.validator_value, error.schema, error.instance
    low, high = rule.get("minimum"), rule.get("maximum")
    if check == "type":
        title = f" ({rule['title']})" if "title" in rule else ""
        return f"must be {_KINDS.get(value, value)}{title}, not {describe(node)}"
    if check in ("minimum", "maximum") and low is not None and high is not None:
        return f"must be from {low} to {high}, not {describe(node)}"
    if check == "minimum":
        return f"must be at least {low}, not {describe(node)}"
    if check == "maximum":
        return f"must be at most {high}, not {describe(node)}"
    if check == "exclusiveMinimum":
        return f"must be greater than {value}, not {describe(node)}"
    if check == "minItems":
        return "is empty; list at least one" if value == 1 else f"must list at least {value}"
    if check == "minLength":
        return "must not be empty" if value == 1 else f"must be at least {value} characters"
    if check == "maxLength":
        return f"must be at most {value} characters, not {len(node):,}"
    if check == "pattern" and "description" in rule:
        return f"{describe(node)}: {rule['description']}"
    if check == "enum":
        choices = [json.dumps(v) for v in value]
        either = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
        return f"must be {either}, not {describe(node)}"
    return f"{describe(node)} is not valid here ({check})"  # pragma: no cover (a new keyword)


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


def _semantic_problems(doc: Any) -> list[Problem]:
    """What the schema cannot say. Tolerates a doc that failed the schema: it checks
    whatever parts are well-formed, so one run reports every problem."""
    apps = doc.get("Apps") if isinstance(doc, dict) else None
    if not isinstance(apps, list):
        return []
    problems: list[Problem] = []
    names: dict[str, int] = {}
    owners: dict[int, int] = {}  # port -> the index of the app it belongs to
    for i, app in enumerate(apps):
        if not isinstance(app, dict):
            continue
        app_name = app.get("Name")
        if isinstance(app_name, str):
            if app_name in names:
                problems.append((("Apps", i, "Name"), None, f"{quote(app_name)} is already "
                                 f"the name of Apps[{names[app_name]}]"))
            names.setdefault(app_name, i)
        ports = app.get("Ports")
        for j, port in enumerate(ports if isinstance(ports, list) else []):
            if not isinstance(port, int) or isinstance(port, bool):
                continue
            if port in owners:
                owner = owners[port]
                problems.append((("Apps", i, "Ports", j), None, f"port {port} is already used "
                                 f"by Apps[{owner}] ({quote(apps[owner].get('Name'))})"))
            else:
                owners[port] = i
        targets = app.get("Targets")
        seen: dict[Target, int] = {}
        for j, text in enumerate(targets if isinstance(targets, list) else []):
            if not isinstance(text, str):
                continue
            try:
                target = Target.parse(text)
            except ValueError as e:
                problems.append((("Apps", i, "Targets", j), None, f"{quote(text)}: {e}"))
                continue
            if target in seen:
                problems.append((("Apps", i, "Targets", j), None,
                                 f"{quote(text)} is already listed as Targets[{seen[target]}]"))
            seen.setdefault(target, j)
    return problems
