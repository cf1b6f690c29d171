"""The config loader: the challenge's format, every error named with file, place, path and
problem, in words an operator knows (the table below holds every message the schema gives)."""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest

from appliance import config
from helpers import REPO, run_cli

CHALLENGE = REPO.parent / "shared" / "mission" / "config.json"


def doc(*apps):
    return json.dumps({"Apps": list(apps)})


def app(name="a", ports=(1000,), targets=("127.0.0.1:1",)):
    return {"Name": name, "Ports": list(ports), "Targets": list(targets)}


def errors_of(text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text, "cfg.json")
    return info.value.errors


def unplaced(errors: list[str]) -> list[str]:
    """The errors without their ``line:column: ``."""
    return [re.sub(r"^\d+:\d+: ", "", e) for e in errors]


def marked(text: str) -> tuple[str, str]:
    """A document with a ``»`` where the problem starts -> (the document, ``"line:col: "``)."""
    offset = text.index("»")
    text = text.replace("»", "", 1)
    line_start = text.rfind("\n", 0, offset) + 1
    return text, f"{text.count(chr(10), 0, offset) + 1}:{offset - line_start + 1}: "


def test_repo_config_is_the_challenge_config():
    ours = config.load(REPO / "config.json")
    assert [a.name for a in ours.apps] == ["five-thousand", "six-thousand", "seven-thousand"]
    assert ours.ports == {5001, 5200, 5300, 5400, 6001, 6200, 6300, 6400, 7001, 7200, 7300, 7400}
    assert config.Target("bad.target.for.testing", 6003) in ours.apps[1].targets
    if CHALLENGE.exists():
        assert json.loads(CHALLENGE.read_text()) == json.loads((REPO / "config.json").read_text())


@pytest.mark.parametrize("text, host, port", [
    ("tcp-echo.fly.dev:5001", "tcp-echo.fly.dev", 5001),
    ("127.0.0.1:80", "127.0.0.1", 80),
    ("[::1]:8080", "::1", 8080),
    ("localhost:65535", "localhost", 65535),
])
def test_target_forms(text, host, port):
    target = config.Target.parse(text)
    assert (target.host, target.port) == (host, port)
    assert str(target) == text


@pytest.mark.parametrize("target, problem", [
    ("nocolon", "not host:port"),
    ("host:0", "port 0 is not a number from 1 to 65535"),
    ("host:65536", "port 65536 is not a number from 1 to 65535"),
    ("host:http", 'port "http" is not a number from 1 to 65535'),
    ("::1:80", "needs [brackets]"),
    ("[nonsense]:80", "not an IPv6 address"),
    ("under_score:80", "not a valid host name"),
    (":80", "not host:port"),
])
def test_bad_targets_are_named(target, problem):
    errors = unplaced(errors_of(doc(app(targets=["127.0.0.1:1", target]))))
    assert len(errors) == 1
    assert errors[0].startswith("Apps[0].Targets[1]: ")
    assert problem in errors[0]


@pytest.mark.parametrize("apps, expected", [
    ([app(), app("b", ports=[2000, 1000])], 'Apps[1].Ports[1]: port 1000 is already used by Apps[0] ("a")'),
    ([app(ports=[1000, 1000])], 'Apps[0].Ports[1]: port 1000 is already used by Apps[0] ("a")'),
    ([app(), app(ports=[2000])], 'Apps[1].Name: "a" is already the name of Apps[0]'),
    ([app(targets=["h:1", "h:1"])], 'Apps[0].Targets[1]: "h:1" is already listed as Targets[0]'),
])
def test_semantic_errors(apps, expected):
    assert expected in unplaced(errors_of(doc(*apps)))


def test_all_errors_are_reported_at_once_in_the_files_order():
    errors = errors_of(doc(app(ports=[0, 1000, 1000], targets=["bad", "h:1"]),
                           app(ports=[1000], targets=["[::1]:99999"])))
    assert errors == [
        "1:35: Apps[0].Ports[0]: must be from 1 to 65535, not 0",
        '1:44: Apps[0].Ports[2]: port 1000 is already used by Apps[0] ("a")',
        '1:63: Apps[0].Targets[0]: "bad": not host:port',
        '1:88: Apps[1].Name: "a" is already the name of Apps[0]',
        '1:103: Apps[1].Ports[0]: port 1000 is already used by Apps[0] ("a")',
        '1:122: Apps[1].Targets[0]: "[::1]:99999": port 99999 is not a number from 1 to 65535',
    ]


# Every message the schema can give, each from the smallest document that gives it; ``»``
# marks where the message must place it. test_the_table_covers_every_schema_rule keeps the
# table complete when the schema grows.
A = '"Name": "a", "Ports": [1], "Targets": ["h:1"]'  # an app's required keys, well-formed


def in_app(text: str) -> str:
    return '{"Apps": [{%s}]}' % text


def in_check(text: str) -> str:
    return in_app(A + ', "HealthCheck": {%s}' % text)


# the optional per-app keys, in the order an "unknown key" message lists them
APP_KEYS = ("MaxConnections, MaxConnectionsPerClient, MaxConnectionRatePerClient, "
            "MaxConnectionRate, BytesPerSecond, DrainTimeout, ProxyProtocol, Balance, HealthCheck")

SCHEMA_MESSAGES = [
    # the document
    ("»[]", "(top level): must be an object {...} (flyproxy configuration), not a list"),
    ("»{}", "(top level): missing required key 'Apps'"),
    ('{»"apps": []}', "(top level): unknown key 'apps'; did you mean 'Apps'?"),
    ('{"Apps": [], »"Version": 2}', "(top level): unknown key 'Version'; the keys here are Apps"),
    ('{"Apps": »{}}', "Apps: must be a list [...], not an object"),
    ('{"Apps": [»"a"]}', 'Apps[0]: must be an object {...}, not "a"'),
    # an app's keys: a misspelt required key is one mistake, said once, with the key meant
    (in_app('"Name": "a", »"Port": [1], "Targets": ["h:1"]'),
     "Apps[0]: unknown key 'Port'; did you mean 'Ports'?"),
    (in_app('"Name": "a", "Ports": [1], »"targets": ["h:1"]'),
     "Apps[0]: unknown key 'targets'; did you mean 'Targets'?"),
    (in_app(A + ', »"MaxConnection": 5'),
     "Apps[0]: unknown key 'MaxConnection'; did you mean 'MaxConnections'?"),
    (in_app(A + ', »"Extra": 1'), "Apps[0]: unknown key 'Extra'; the keys here are Name, Ports, "
                                 "Targets, " + APP_KEYS),
    ('{"Apps": [»{"Name": "a"}]}', "Apps[0]: missing required keys 'Ports' and 'Targets'"),
    ('{"Apps": [»{"Name": "a", "Ports": [1]}]}', "Apps[0]: missing required key 'Targets'"),
    # Name
    (in_app('"Name": »7, "Ports": [1], "Targets": ["h:1"]'), "Apps[0].Name: must be a string, not 7"),
    (in_app('"Name": »"", "Ports": [1], "Targets": ["h:1"]'), "Apps[0].Name: must not be empty"),
    (in_app('"Name": »"%s", "Ports": [1], "Targets": ["h:1"]' % ("n" * 65)),
     "Apps[0].Name: must be at most 64 characters, not 65"),
    (in_app('"Name": »"a b", "Ports": [1], "Targets": ["h:1"]'),
     'Apps[0].Name: "a b": an app name is ASCII letters, digits, \'.\', \'_\' and \'-\', '
     "starting with a letter or digit"),
    # Ports
    (in_app('"Name": "a", "Ports": »5001, "Targets": ["h:1"]'),
     "Apps[0].Ports: must be a list [...], not 5001"),
    (in_app('"Name": "a", "Ports": »[], "Targets": ["h:1"]'),
     "Apps[0].Ports: is empty; list at least one"),
    (in_app('"Name": "a", "Ports": [»true], "Targets": ["h:1"]'),
     "Apps[0].Ports[0]: must be a whole number (a port), not true"),
    (in_app('"Name": "a", "Ports": [»"80"], "Targets": ["h:1"]'),
     'Apps[0].Ports[0]: must be a whole number (a port), not "80"'),
    (in_app('"Name": "a", "Ports": [»7401.0], "Targets": ["h:1"]'),
     "Apps[0].Ports[0]: must be a whole number (a port), not 7401.0"),
    (in_app('"Name": "a", "Ports": [1, »0], "Targets": ["h:1"]'),
     "Apps[0].Ports[1]: must be from 1 to 65535, not 0"),
    (in_app('"Name": "a", "Ports": [»65536], "Targets": ["h:1"]'),
     "Apps[0].Ports[0]: must be from 1 to 65535, not 65536"),
    # Targets
    (in_app('"Name": "a", "Ports": [1], "Targets": »"h:1"'),
     'Apps[0].Targets: must be a list [...], not "h:1"'),
    (in_app('"Name": "a", "Ports": [1], "Targets": »[]'), "Apps[0].Targets: is empty; list at least one"),
    (in_app('"Name": "a", "Ports": [1], "Targets": [»5001]'),
     "Apps[0].Targets[0]: must be a string (host:port), not 5001"),
    pytest.param(in_app('"Name": "a", "Ports": [1], "Targets": [»"%s:1"]' % ("h" * 299)),
                 "Apps[0].Targets[0]: must be at most 300 characters, not 301", id="long target"),
    # the optional keys
    (in_app(A + ', "MaxConnections": »"10"'), 'Apps[0].MaxConnections: must be a whole number, not "10"'),
    (in_app(A + ', "MaxConnections": »0'), "Apps[0].MaxConnections: must be at least 1, not 0"),
    (in_app(A + ', "MaxConnectionsPerClient": »"2"'),
     'Apps[0].MaxConnectionsPerClient: must be a whole number, not "2"'),
    (in_app(A + ', "MaxConnectionsPerClient": »0'),
     "Apps[0].MaxConnectionsPerClient: must be at least 1, not 0"),
    (in_app(A + ', "MaxConnectionRatePerClient": »"5/s"'),
     'Apps[0].MaxConnectionRatePerClient: must be a number (connections per second), not "5/s"'),
    (in_app(A + ', "MaxConnectionRatePerClient": »0'),
     "Apps[0].MaxConnectionRatePerClient: must be greater than 0, not 0"),
    (in_app(A + ', "MaxConnectionRatePerClient": »1e7'),
     "Apps[0].MaxConnectionRatePerClient: must be at most 1000000, not 1e7"),
    (in_app(A + ', "MaxConnectionRate": »[]'),
     "Apps[0].MaxConnectionRate: must be a number (connections per second), not a list"),
    (in_app(A + ', "MaxConnectionRate": »-1'), "Apps[0].MaxConnectionRate: must be greater than 0, not -1"),
    (in_app(A + ', "MaxConnectionRate": »2000000'),
     "Apps[0].MaxConnectionRate: must be at most 1000000, not 2000000"),
    (in_app(A + ', "BytesPerSecond": »1.5'), "Apps[0].BytesPerSecond: must be a whole number, not 1.5"),
    (in_app(A + ', "BytesPerSecond": »0'), "Apps[0].BytesPerSecond: must be at least 1, not 0"),
    (in_app(A + ', "DrainTimeout": »"30s"'), 'Apps[0].DrainTimeout: must be a number (seconds), not "30s"'),
    (in_app(A + ', "DrainTimeout": »-1'), "Apps[0].DrainTimeout: must be from 0 to 31536000, not -1"),
    (in_app(A + ', "DrainTimeout": »1e9'), "Apps[0].DrainTimeout: must be from 0 to 31536000, not 1e9"),
    (in_app(A + ', "ProxyProtocol": »"v3"'), 'Apps[0].ProxyProtocol: must be "v1" or "v2", not "v3"'),
    (in_app(A + ', "ProxyProtocol": »null'), 'Apps[0].ProxyProtocol: must be "v1" or "v2", not null'),
    (in_app(A + ', "Balance": »"round-robin"'),
     'Apps[0].Balance: must be "random" or "least-connections", not "round-robin"'),
    (in_app(A + ', "HealthCheck": »true'), "Apps[0].HealthCheck: must be an object {...}, not true"),
    (in_check('»"Every": 3'), "Apps[0].HealthCheck: unknown key 'Every'; the keys here are "
                              "Interval, Timeout, Rise, Fall"),
    (in_check('»"interval": 3'), "Apps[0].HealthCheck: unknown key 'interval'; did you mean 'Interval'?"),
    (in_check('"Interval": »"2s"'), 'Apps[0].HealthCheck.Interval: must be a number (seconds), not "2s"'),
    (in_check('"Interval": »0'), "Apps[0].HealthCheck.Interval: must be greater than 0, not 0"),
    (in_check('"Interval": »3601'), "Apps[0].HealthCheck.Interval: must be at most 3600, not 3601"),
    (in_check('"Timeout": »[]'), "Apps[0].HealthCheck.Timeout: must be a number (seconds), not a list"),
    (in_check('"Timeout": »-0.5'), "Apps[0].HealthCheck.Timeout: must be greater than 0, not -0.5"),
    (in_check('"Timeout": »60.5'), "Apps[0].HealthCheck.Timeout: must be at most 60, not 60.5"),
    (in_check('"Rise": »1.5'), "Apps[0].HealthCheck.Rise: must be a whole number, not 1.5"),
    (in_check('"Rise": »0'), "Apps[0].HealthCheck.Rise: must be from 1 to 100, not 0"),
    (in_check('"Rise": »101'), "Apps[0].HealthCheck.Rise: must be from 1 to 100, not 101"),
    (in_check('"Fall": »false'), "Apps[0].HealthCheck.Fall: must be a whole number, not false"),
    (in_check('"Fall": »0'), "Apps[0].HealthCheck.Fall: must be from 1 to 100, not 0"),
    (in_check('"Fall": »1000'), "Apps[0].HealthCheck.Fall: must be from 1 to 100, not 1000"),
]


@pytest.mark.parametrize("document, expected", SCHEMA_MESSAGES)
def test_every_schema_message(document, expected):
    text, place = marked(document)
    assert errors_of(text) == [place + expected]


def test_the_table_covers_every_schema_rule():
    """Each rule of the schema (a keyword that can fail) gives a message in the table above."""
    def rules(node, path=()):
        for key, value in node.items():
            if key in ("properties",):
                for name, sub in value.items():
                    yield from rules(sub, path + (key, name))
            elif key == "items":
                yield from rules(value, path + (key,))
            elif key not in ("$schema", "$id", "title", "description"):
                yield path + (key,)

    validator = jsonschema.Draft202012Validator(config.schema())
    texts = [row.values[0] if hasattr(row, "values") else row[0] for row in SCHEMA_MESSAGES]
    covered = {tuple(e.relative_schema_path) for text in texts
               for e in validator.iter_errors(json.loads(marked(text)[0]))}
    assert set(rules(config.schema())) - covered == set()


@pytest.mark.parametrize("document, expected", [
    # syntax, in an operator's words
    ('{"Apps": [\n  {"Name": »}\n]}', "invalid JSON: expected a value, found '}'"),
    ('{"Apps": [1, 2»]}'.replace("2»", "2,»"), "invalid JSON: a comma before ']' (JSON allows none)"),
    ('{"Apps": [{"Name": "a",\n »}]}', "invalid JSON: a comma before '}' (JSON allows none)"),
    ("{»'Apps': []}", "invalid JSON: a single quote: JSON strings and keys take double quotes"),
    ('{\n  »// the apps\n  "Apps": []}', "invalid JSON: a comment: JSON has none"),
    ('{"Apps": [{"Name": "a"} »{"Name": "b"}]}', "invalid JSON: expected ',' or a closing bracket, found '{'"),
    ('{"Apps" »[]}', "invalid JSON: expected ':' after the key, found '['"),
    ('{"Apps": [], »Version: 1}', "invalid JSON: expected a key in double quotes, found 'Version'"),
    ('{"Apps": [{"Name": »"a}]}', "invalid JSON: a string with no closing '\"'"),
    ('{"Apps": [{"Name": "a»\n"}]}', "invalid JSON: a control character inside a string "
                                      "(write a line break as \\n, a tab as \\t)"),
    ('{"Apps": [{"Name": "a»\\x"}]}', "invalid JSON: an invalid escape in a string "
                                        "(a backslash is written \\\\)"),
    ('{"Apps": []}\n»}', "invalid JSON: more text after the end of the document"),
    ('»', "invalid JSON: empty: no JSON document at all"),
    ('\n  »', "invalid JSON: empty: no JSON document at all"),
    ('{"Apps": [»', "invalid JSON: expected a value, found the end of the text"),
    # what json refuses without a place, placed
    ('{"Apps": [], »"Apps": []}', "(top level): key 'Apps' appears twice in one object (first at 1:2)"),
    ('{"Apps": [{"Name": "a", "Ports": [»NaN], "Targets": ["h:1"]}]}',
     "Apps[0].Ports[0]: NaN is not a JSON number"),
    ('{"Apps": [{"Name": "a", "Ports": [»-Infinity], "Targets": ["h:1"]}]}',
     "Apps[0].Ports[0]: -Infinity is not a JSON number"),
    pytest.param('{"Apps": [{"Name": "a", "Ports": [»%s], "Targets": ["h:1"]}]}' % ("9" * 5000),
                 "Apps[0].Ports[0]: a number with too many digits", id="5000 digits"),
    (in_app(A + ', "X": [[[[[[[[[[[[[»[]]]]]]]]]]]]]]'),
     "Apps[0].X[0][0][0][0][0][0][0][0][0][0][0][0][0]: nested more than 16 levels deep"),
    ("»\ufeff\ufeff{}", "invalid JSON: a second byte order mark (U+FEFF)"),
])
def test_broken_documents(document, expected):
    text, place = marked(document)
    assert errors_of(text) == [place + expected]


@pytest.mark.parametrize("data, expected", [
    (b'{"Apps": [\n  {"Name": "caf\xc3\xa9\xe9"}]}', "2:17: not UTF-8 text (byte 0xe9); save it as UTF-8"),
    ("\ufeff[]".encode("utf-16"), "1:1: is UTF-16 text (it starts with a UTF-16 byte order mark); "
                                  "save it as UTF-8"),
])
def test_text_that_is_not_utf8(data, expected):
    assert errors_of(data) == [expected]


def test_a_utf8_byte_order_mark_is_accepted():
    """RFC 8259 8.1 lets a parser ignore one, and Windows editors write one; places count
    from after it; the digest is still of the bytes as they are."""
    raw = b"\xef\xbb\xbf" + doc(app()).encode()
    assert config.loads(raw).digest == __import__("hashlib").sha256(raw).hexdigest()
    assert errors_of(b"\xef\xbb\xbf{}") == ["1:1: (top level): missing required key 'Apps'"]


def test_places_in_a_file_laid_out_by_hand():
    text = json.dumps({"Apps": [
        app("five-thousand", [5001], ["tcp-echo.fly.dev:5001"]),
        {"Name": "six", "Port": [6001], "Targets": ["h:1"]},
        app("seven", [7001, True], ["h:1", "x"]),
    ]}, indent=4)
    assert errors_of(text) == [
        "14:13: Apps[1]: unknown key 'Port'; did you mean 'Ports'?",
        "25:17: Apps[2].Ports[1]: must be a whole number (a port), not true",
        '29:17: Apps[2].Targets[1]: "x": not host:port',
    ]
    lines = text.splitlines()
    assert lines[13][12:].startswith('"Port"') and lines[24][16:] == "true"
    assert lines[28][16:] == '"x"'


def test_an_empty_apps_is_valid_with_a_warning():
    """The schema allows it (a proxy may be set up before its apps); serve would listen on
    nothing, so check says so, without failing."""
    loaded = config.loads('{\n  "Apps": []\n}')
    assert loaded.apps == () and loaded.warnings == (
        "2:11: Apps: is empty: the proxy would listen on no port",)
    assert config.loads(doc(app())).warnings == ()


def test_error_string_names_the_file():
    with pytest.raises(config.ConfigError) as info:
        config.loads("{}", "/etc/flyproxy/config.json")
    assert str(info.value) == "/etc/flyproxy/config.json:1:1: (top level): missing required key 'Apps'"
    with pytest.raises(config.ConfigError) as info:
        config.loads("x" * (config.MAX_BYTES + 1), "big.json")
    assert str(info.value).startswith("big.json: is 1,048,577 bytes")


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="missing.json: cannot read: No such file"):
        config.load(tmp_path / "missing.json")


def test_diff():
    old = config.loads(doc(app("a", [1, 2], ["h:1"]), app("b", [3], ["h:2"]), app("c", [4], ["h:3"])))
    new = config.loads(doc(app("a", [1, 5], ["h:1"]), app("b", [4], ["h:9"]), app("c", [3], ["h:3"])))
    change = config.diff(old, new)
    assert change.added_ports == {5}
    assert change.removed_ports == {2}
    assert change.moved_ports == {3, 4}
    assert change.retargeted_apps == ("b",)
    assert not config.diff(old, old)
    assert str(config.diff(old, old)) == "no changes"
    assert "ports added: 5" in str(change)


@pytest.mark.parametrize("how", [["-c", "{path}"], ["{path}"], ["{path}", "-c", "{path}"]])
def test_cli_check_good(how):
    path = str(REPO / "config.json")
    result = run_cli("check", *(arg.format(path=path) for arg in how))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: OK: 3 apps, 12 ports, 7 targets\n"
    assert result.stderr == ""


@pytest.mark.parametrize("how", [["-c", "{path}"], ["{path}"], ["-"], ["-c", "-"]])
def test_cli_check_bad(tmp_path, how):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"Apps": [app(ports=[70000], targets=["x"])]}, indent=2))
    result = run_cli("check", *(arg.format(path=path) for arg in how), input=path.read_text())
    assert result.returncode == 1
    name = "<stdin>" if "-" in how else path
    assert result.stderr.splitlines() == [
        f"{name}:6:9: Apps[0].Ports[0]: must be from 1 to 65535, not 70000",
        f'{name}:9:9: Apps[0].Targets[0]: "x": not host:port',
    ]
    assert result.stdout == ""


def test_cli_check_warns_of_an_empty_apps_and_passes():
    result = run_cli("check", "-", input='{"Apps": []}')
    assert result.returncode == 0, result.stderr
    assert result.stderr == "<stdin>:1:10: warning: Apps: is empty: the proxy would listen on no port\n"
    assert result.stdout == "<stdin>: OK: 0 apps, 0 ports, 0 targets\n"


def test_cli_check_takes_one_file(tmp_path):
    result = run_cli("check", str(tmp_path / "a.json"), "-c", str(tmp_path / "b.json"))
    assert result.returncode == 2
    assert result.stderr == (f"flyproxy check: two files given ({tmp_path}/a.json, "
                             f"{tmp_path}/b.json); check one at a time\n")


# -- hostile input (found by an adversarial run): refused, bounded, quoted briefly ----------

@pytest.mark.parametrize("ports", ["[7401.0]", "[5.001e3]", "[7401e0]"])
def test_a_port_written_as_a_float_is_refused_even_when_integral(ports):
    text = '{"Apps": [{"Name": "a", "Ports": %s, "Targets": ["127.0.0.1:1"]}]}' % ports
    (error,) = errors_of(text)
    assert error == f"1:35: Apps[0].Ports[0]: must be a whole number (a port), not {ports[1:-1]}"


def test_an_integral_float_cannot_take_a_port_from_another_app():
    text = doc(app("a", [7401]), app("b", [7401.0]))
    assert any("Apps[1].Ports[0]" in e for e in unplaced(errors_of(text)))


@pytest.mark.parametrize("target", ["127.0.0.1:٩٠٠٠", "127.0.0.1:９０００", "host:9０"])
def test_a_target_port_takes_ascii_digits_only(target):
    (error,) = errors_of(doc(app(targets=[target])))
    assert "is not a number from 1 to 65535" in error


@pytest.mark.parametrize("name", ["a b", "\ud800x", "app/1", "-lead", "ünïcode", "x\n"])
def test_app_names_are_restricted_to_a_sane_set(name):
    (error,) = unplaced(errors_of(json.dumps({"Apps": [app(name)]})))
    assert error.startswith("Apps[0].Name: ") and "ASCII letters, digits" in error


@pytest.mark.parametrize("name", ["five-thousand", "App_2", "a.b", "9"])
def test_ordinary_app_names_pass(name):
    assert config.loads(doc(app(name)), "cfg.json").apps[0].name == name


@pytest.mark.parametrize("depth", [17, 500, 980, 5000, 60000])
def test_deep_nesting_is_a_clear_error_not_a_crash(depth):
    text = '{"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"], "X": ' + \
        "[" * depth + "]" * depth + "}]}"
    (error,) = errors_of(text)
    assert "nested" in error and "deep" in error


def test_nan_and_infinity_are_not_json():
    (error,) = errors_of('{"Apps": [{"Name": "a", "Ports": [NaN], "Targets": ["h:1"]}]}')
    assert "NaN is not a JSON number" in error


def test_messages_quote_huge_input_briefly():
    errors = errors_of(doc(app("x" * 200_000, targets=["y" * 100_000 + ":1"])))
    assert errors and all(len(e) < 400 for e in errors), [len(e) for e in errors]
    keys = errors_of(json.dumps({"Apps": [{**app(), "k" * 100_000 + "\n": 1}]}))
    assert keys == [f"1:70: Apps[0]: unknown key '{'k' * 60}'... (100,001 characters); the keys "
                    "here are Name, Ports, Targets, " + APP_KEYS]


def test_thousands_of_errors_are_counted_not_all_listed():
    errors = errors_of(doc(app(ports=[70000 + i for i in range(3000)])))
    assert len(errors) == config.MAX_ERRORS + 1
    assert errors[-1] == f"(and {3000 - config.MAX_ERRORS} more problems)"


def test_only_a_regular_file_is_read(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(config.ConfigError) as info:  # returns at once: nothing waits on it
        config.load(fifo)
    assert str(info.value) == f"{fifo}: not a regular file"
    for path in ("/dev/zero", str(tmp_path)):
        with pytest.raises(config.ConfigError) as info:
            config.load(path)
        assert "not a regular file" in str(info.value)


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: 200 MB that cost no disk
    with pytest.raises(config.ConfigError) as info:
        config.load(big)
    assert str(info.value) == (f"{big}: is {200 * 1024 * 1024:,} bytes; a config may have at "
                               f"most {config.MAX_BYTES:,}")


# -- the optional per-app keys: ProxyProtocol, Balance, HealthCheck -----------------------

def test_optional_keys_parse_and_the_challenge_format_needs_none():
    plain = config.loads(doc(app()))
    assert (plain.apps[0].proxy_protocol, plain.apps[0].balance, plain.apps[0].health_check) == \
        (None, "random", None)
    rich = config.loads(doc({**app(), "ProxyProtocol": "v1", "Balance": "least-connections",
                             "HealthCheck": {"Interval": 5, "Timeout": 0.5, "Rise": 1,
                                             "Fall": 4}}))
    a = rich.apps[0]
    assert (a.proxy_protocol, a.balance) == ("v1", "least-connections")
    assert a.health_check == config.HealthCheck(5.0, 0.5, 1, 4)
    assert a.options() == ("ProxyProtocol v1, Balance least-connections, HealthCheck every 5s "
                           "(timeout 0.5s, rise 1, fall 4)")


def test_optional_keys_bad_values_name_the_place():
    errors = unplaced(errors_of(doc({**app(), "ProxyProtocol": "v3", "Balance": "round-robin",
                                     "HealthCheck": {"Interval": 0, "Fall": 0, "Every": 3}})))
    assert errors == [
        'Apps[0].ProxyProtocol: must be "v1" or "v2", not "v3"',
        'Apps[0].Balance: must be "random" or "least-connections", not "round-robin"',
        "Apps[0].HealthCheck.Interval: must be greater than 0, not 0",
        "Apps[0].HealthCheck.Fall: must be from 1 to 100, not 0",
        "Apps[0].HealthCheck: unknown key 'Every'; the keys here are Interval, Timeout, Rise, Fall",
    ]


def test_a_changed_option_is_a_change_for_reload():
    old = config.loads(doc(app()))
    new = config.loads(doc({**app(), "ProxyProtocol": "v2"}))
    change = config.diff(old, new)
    assert change and change.reoptioned_apps == ("a",)
    assert str(change) == "options changed: a"


def test_cli_check_lists_the_options_an_app_uses(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(doc({**app("pp"), "ProxyProtocol": "v2"}, app("plain", ports=[2000])))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["  pp: ProxyProtocol v2"]


def test_one_message_per_mistake():
    """A node that breaks two rules (or a rule and a semantic check) gets one message."""
    assert unplaced(errors_of(doc(app(ports=[0, 0])))) == [
        "Apps[0].Ports[0]: must be from 1 to 65535, not 0",
        "Apps[0].Ports[1]: must be from 1 to 65535, not 0",
    ]
    assert unplaced(errors_of(doc(app("a b" * 30)))) == ["Apps[0].Name: must be at most 64 "
                                                         "characters, not 90"]


def test_keys_and_values_in_messages_are_escaped_onto_one_line():
    errors = unplaced(errors_of(json.dumps({"Apps": [{**app("x\n"), "it's\n": 1}]})))
    assert errors == [
        "Apps[0].Name: \"x\\n\": an app name is ASCII letters, digits, '.', '_' and '-', "
        "starting with a letter or digit",
        "Apps[0]: unknown key 'it\\'s\\n'; the keys here are Name, Ports, Targets, " + APP_KEYS,
    ]
