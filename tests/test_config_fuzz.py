"""The config loader, fuzzed: whatever the input, a Config or a clean ConfigError (one line per
problem, each placed in the text), never a crash."""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from appliance import config

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25)

ports = st.one_of(st.integers(-5, 70000), st.sampled_from([80, 5001, 0, 65535, 65536]),
                  st.sampled_from([7401.0, 5001.0, 1e3, 65535.0]),  # integral floats: refused
                  st.text(max_size=5), st.floats(allow_nan=False), st.none())
targets = st.one_of(
    st.from_regex(r"\A[a-z0-9.\-_:\[\]]{0,30}\Z"),
    st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["localhost", "10.0.0.1", "[::1]", "::1", "a..b", ""]),
              st.integers(-1, 70000)),
    st.builds(lambda d: f"127.0.0.1:{d}",  # non-ASCII digits: refused
              st.text(alphabet="0123456789\u0660\u0669\uff10\uff19", min_size=1, max_size=5)),
    st.integers())
apps = st.fixed_dictionaries(
    {"Name": st.one_of(st.text(max_size=8), st.integers(),
                       st.sampled_from(["\ud800", "a\udfff", "ok-name", "x\n", "a" * 65])),
     "Ports": st.lists(ports, max_size=4),
     "Targets": st.lists(targets, max_size=4)},
    optional={"MaxConnections": st.one_of(st.integers(-1, 5), st.text(max_size=3)),
              "Extra": json_values})
documents = st.one_of(json_values, st.fixed_dictionaries({"Apps": st.lists(apps, max_size=4)}))


def check(data) -> None:
    try:
        result = config.loads(data, "fuzz.json")
    except config.ConfigError as e:
        assert e.errors and all(isinstance(x, str) and x for x in e.errors)
        lines = (data if isinstance(data, str) else data.decode("utf-8", "replace")).split("\n")
        for error in e.errors:  # one line each, placed in the text (the count of the rest aside)
            assert "\n" not in error
            if error.startswith("(and "):
                continue
            line, column = map(int, re.match(r"(\d+):(\d+): \S", error).groups())
            assert 1 <= line <= len(lines) and 1 <= column <= len(lines[line - 1]) + 1, error
            assert "Traceback" not in error and "is not of type" not in error
        assert all(line.startswith("fuzz.json:") for line in str(e).split("\n"))
    else:
        assert isinstance(result, config.Config)
        assert len(result.routes) == len(result.ports)  # no port belongs to two apps
        for app in result.apps:  # what passes is what the data plane and metrics can use
            assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", app.name)
            assert all(type(p) is int and 1 <= p <= 65535 for p in app.ports)
            assert all(type(t.port) is int and t.host.isascii() for t in app.targets)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_structured_documents(doc):
    check(json.dumps(doc))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    check(data)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet='{}[]":,0123456789 \\nAppsNamePortsTargets.-', max_size=120))
def test_json_looking_text(text):
    check(text)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.sampled_from(["[", "{\"k\":"]))
def test_any_nesting_depth(depth, opener):
    closer = "]" if opener == "[" else "}"
    check('{"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"], "X": '
          + opener * depth + "1" * (opener != "[") + closer * depth + "}]}")
