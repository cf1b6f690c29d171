"""Places in a JSON text, for messages that say ``line:column``.

``json.loads`` builds values, not positions, so :class:`Text` walks the text a second time,
only when something must be placed (the load path of a good config never comes here):

- :meth:`Text.locate` finds where the nodes at some JSON paths start (an object member
  also gives where its key starts), descending only into the containers on the way to
  them and skipping everything else with json's own C scanner;
- :meth:`Text.first_fault` finds the first thing ``json.loads`` refused without saying
  where (a key twice in one object, ``NaN``, nesting deeper than allowed);
- :func:`explain` turns a ``JSONDecodeError`` into words an operator knows.

The walk recurses once per nesting level and is only run on texts json.loads parsed (up to
the fault) or on depths it bounds itself, so it is bounded by the text's size.
"""

from __future__ import annotations

import bisect
import json
import re
from json.decoder import scanstring
from typing import Any, Iterable

__all__ = ["Text", "describe", "explain", "name", "quote", "reject_constant"]

Path = tuple  # ("Apps", 1, "Ports", 0)
_WS = re.compile(r"[ \t\n\r]*")


def reject_constant(word: str):
    """json's ``parse_constant``: NaN, Infinity and -Infinity are not JSON."""
    raise ValueError(f"{word} is not a JSON number")


_SCAN = json.JSONDecoder(parse_constant=reject_constant).scan_once  # one value, at C speed


def name(key: str, limit: int = 60) -> str:
    """A key as a message shows it: ``'Ports'`` (control characters escaped, long ones cut)."""
    text = "".join(c if c.isprintable() and c not in "'\\" else
                   "\\'" if c == "'" else json.dumps(c)[1:-1] for c in key[:limit])
    return f"'{text}'" + (f"... ({len(key):,} characters)" if len(key) > limit else "")


class _Fault(Exception):
    def __init__(self, offset: int, path: Path, message: str):
        super().__init__(message)
        self.offset, self.path, self.message = offset, path, message


class Text:
    """A JSON document's text, with line:column for any offset into it."""

    def __init__(self, text: str):
        self.text = text
        self._newlines: list[int] | None = None

    def place(self, offset: int) -> str:
        """``"12:9"``: the 1-based line and column (in characters) of ``offset``."""
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer("\n", self.text)]
        line = bisect.bisect_left(self._newlines, offset)
        start = self._newlines[line - 1] + 1 if line else 0
        return f"{line + 1}:{offset - start + 1}"

    def locate(self, paths: Iterable[Path]) -> dict[Path, tuple[int, int]]:
        """Where each path's node starts: ``{path: (key offset, value offset)}``; the two are
        the same for an array's item and for the document itself. Paths not in the text are
        left out. The text must be one that json.loads accepted."""
        wanted = set(paths)
        walk = _Walk(self, wanted, {p[:i] for p in wanted for i in range(len(p))}, 0)
        try:
            walk.value(_WS.match(self.text).end(), (), 1)
        except (_Fault, StopIteration, IndexError, ValueError, RecursionError):
            pass  # not a text json.loads accepted: what was found so far
        return walk.found

    def first_fault(self, max_depth: int) -> tuple[int, Path, str] | None:
        """The first place (in reading order) json.loads refused without a position, or a
        container nested deeper than ``max_depth``: ``(offset, path, message)``."""
        walk = _Walk(self, set(), None, max_depth)
        try:
            walk.value(_WS.match(self.text).end(), (), 1)
        except _Fault as fault:
            return fault.offset, fault.path, fault.message
        except (StopIteration, IndexError, ValueError, RecursionError):
            pass
        return None


class _Walk:
    """One walk over a text: records ``found`` for ``wanted`` paths, descends into the
    containers whose path is in ``descend`` (every one if None), raises _Fault."""

    def __init__(self, text: Text, wanted: set, descend: set | None, max_depth: int):
        self.where, self.text = text, text.text
        self.wanted, self.descend, self.max_depth = wanted, descend, max_depth
        self.found: dict[Path, tuple[int, int]] = {}
        if () in wanted:
            self.found[()] = (start := _WS.match(self.text).end(), start)

    def value(self, idx: int, path: Path, depth: int) -> int:
        """Walk the value starting at ``idx``; return the offset just after it."""
        char = self.text[idx:idx + 1]
        if char in ("{", "[") and char and (self.descend is None or path in self.descend):
            if self.max_depth and depth > self.max_depth:
                raise _Fault(idx, path, f"nested more than {self.max_depth} levels deep")
            return (self.members if char == "{" else self.items)(idx, path, depth)
        try:
            return _SCAN(self.text, idx)[1]
        except ValueError as e:  # NaN (reject_constant), or a number too long to convert
            message = str(e)
            raise _Fault(idx, path, message if message.endswith("is not a JSON number")
                         else "a number with too many digits") from None

    def members(self, idx: int, path: Path, depth: int) -> int:
        text, seen = self.text, {}
        idx = _WS.match(text, idx + 1).end()
        if text[idx] == "}":
            return idx + 1
        while True:
            key_at = idx
            key, idx = scanstring(text, idx + 1)
            if key in seen:
                raise _Fault(key_at, path, f"key {name(key)} appears twice in one object "
                                           f"(first at {self.where.place(seen[key])})")
            seen[key] = key_at
            idx = _WS.match(text, _WS.match(text, idx).end() + 1).end()  # past ':'
            member = path + (key,)
            if member in self.wanted:
                self.found[member] = (key_at, idx)
            idx = _WS.match(text, self.value(idx, member, depth + 1)).end()
            if text[idx] != ",":
                return idx + 1  # '}'
            idx = _WS.match(text, idx + 1).end()

    def items(self, idx: int, path: Path, depth: int) -> int:
        text, i = self.text, 0
        idx = _WS.match(text, idx + 1).end()
        if text[idx] == "]":
            return idx + 1
        while True:
            item = path + (i,)
            if item in self.wanted:
                self.found[item] = (idx, idx)
            idx = _WS.match(text, self.value(idx, item, depth + 1)).end()
            if text[idx] != ",":
                return idx + 1  # ']'
            idx, i = _WS.match(text, idx + 1).end(), i + 1


# json's syntax messages (CPython 3.11-3.13), in an operator's words
_SYNTAX = {
    "Expecting value": "expected a value",
    "Expecting property name enclosed in double quotes": "expected a key in double quotes",
    "Expecting ':' delimiter": "expected ':' after the key",
    "Expecting ',' delimiter": "expected ',' or a closing bracket",
    "Unterminated string starting at": "a string with no closing '\"'",
    "Invalid control character at": "a control character inside a string "
                                    "(write a line break as \\n, a tab as \\t)",
    "Invalid \\escape": "an invalid escape in a string (a backslash is written \\\\)",
    "Invalid \\uXXXX escape": "an invalid \\uXXXX escape in a string",
    "Extra data": "more text after the end of the document",
    "Unexpected UTF-8 BOM (decode using utf-8-sig)": "a second byte order mark (U+FEFF)",
    "Illegal trailing comma before end of object": "a comma before '}' (JSON allows none)",
    "Illegal trailing comma before end of array": "a comma before ']' (JSON allows none)",
}


def explain(text: str, error: json.JSONDecodeError) -> str:
    """What is wrong at ``error.pos``, without json's internal wording."""
    pos, rest = error.pos, text[error.pos:error.pos + 2]
    if not text.strip(" \t\n\r"):
        return "empty: no JSON document at all"
    if error.msg in ("Expecting value", "Expecting property name enclosed in double quotes"):
        if rest[:1] in ("]", "}") and text[:pos].rstrip(" \t\n\r").endswith(","):
            return f"a comma before '{rest[0]}' (JSON allows none)"
        if rest[:1] == "'":
            return "a single quote: JSON strings and keys take double quotes"
        if rest in ("//", "/*") or rest[:1] == "#":
            return "a comment: JSON has none"
    words = _SYNTAX.get(error.msg, error.msg[:1].lower() + error.msg[1:])
    if error.msg.startswith("Expecting"):
        words += ", found " + (_token(text, pos) if pos < len(text) else "the end of the text")
    return words


_TOKEN = re.compile(r"[A-Za-z0-9_.+-]{1,20}|.", re.S)  # a word, a number or one character


def _token(text: str, pos: int) -> str:
    return name(_TOKEN.match(text, pos)[0])


def describe(value: Any) -> str:
    """A parsed JSON value as JSON spells it, briefly: ``true``, ``"80"``, ``7401.0``, ``a list``."""
    if value is True or value is False or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return quote(value)


def quote(value: Any, limit: int = 60) -> str:
    """A string as JSON writes it (``"a b"``), with characters that do not print escaped and
    cut to ``limit``; anything else as ``repr`` does, cut: a message never carries a huge
    input back."""
    if not isinstance(value, str):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"
    body = value[:limit]
    if not body.isprintable() or '"' in body or "\\" in body:
        body = "".join(c if c.isprintable() and c not in '"\\' else json.dumps(c)[1:-1]
                       for c in body)
    return f'"{body}"' + (f"... ({len(value):,} characters)" if len(value) > limit else "")
