"""The config loader: the challenge's format, every error named with file, path and problem."""

from __future__ import annotations

import json
import os

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
    ("host:0", "port '0' is not a number from 1 to 65535"),
    ("host:65536", "port '65536' is not a number"),
    ("host:http", "port 'http' is not a number"),
    ("::1:80", "needs [brackets]"),
    ("[nonsense]:80", "not an IPv6 address"),
    ("under_score:80", "not a valid host name"),
    (":80", "not host:port"),
])
def test_bad_targets_are_named(target, problem):
    errors = errors_of(doc(app(targets=["127.0.0.1:1", target])))
    assert len(errors) == 1
    assert errors[0].startswith("Apps[0].Targets[1]: ")
    assert problem in errors[0]


@pytest.mark.parametrize("apps, expected", [
    ([app(ports=[0])], "Apps[0].Ports[0]: 0 is less than the minimum of 1"),
    ([app(ports=[65536])], "Apps[0].Ports[0]: 65536 is greater than the maximum of 65535"),
    ([app(ports=["80"])], "Apps[0].Ports[0]: '80' is not of type 'integer'"),
    ([app(ports=[])], "Apps[0].Ports: is empty; list at least one"),
    ([app(targets=[])], "Apps[0].Targets: is empty; list at least one"),
    ([app(), app("b", ports=[2000, 1000])], "Apps[1].Ports[1]: port 1000 is already used by Apps[0] ('a')"),
    ([app(ports=[1000, 1000])], "Apps[0].Ports[1]: port 1000 is already used by Apps[0] ('a')"),
    ([app(), app(ports=[2000])], "Apps[1].Name: 'a' is already the name of Apps[0]"),
    ([app(targets=["h:1", "h:1"])], "Apps[0].Targets[1]: 'h:1' is already listed as Targets[0]"),
    ([{"Name": "a", "Ports": [1]}], "Apps[0]: 'Targets' is a required property"),
    ([{**app(), "Port": [1]}], "Apps[0]: Additional properties are not allowed ('Port' was unexpected)"),
])
def test_semantic_and_schema_errors(apps, expected):
    assert expected in errors_of(doc(*apps))


def test_all_errors_are_reported_at_once():
    errors = errors_of(doc(app(ports=[0, 1000, 1000], targets=["bad", "h:1"]),
                           app(ports=[1000], targets=["[::1]:99999"])))
    assert errors == [
        "Apps[0].Ports[0]: 0 is less than the minimum of 1",
        "Apps[0].Ports[2]: port 1000 is already used by Apps[0] ('a')",
        "Apps[0].Targets[0]: 'bad': not host:port",
        "Apps[1].Name: 'a' is already the name of Apps[0]",
        "Apps[1].Ports[0]: port 1000 is already used by Apps[0] ('a')",
        "Apps[1].Targets[0]: '[::1]:99999': port '99999' is not a number from 1 to 65535",
    ]


@pytest.mark.parametrize("text, expected", [
    ('{"Apps": [\n  {"Name": }\n]}', "line 2 column 12: invalid JSON: Expecting value"),
    ('{"Apps": [], "Apps": []}', "invalid JSON: key 'Apps' appears twice in one object"),
    ("[]", "(top level): [] is not of type 'object'"),
    ("{}", "(top level): 'Apps' is a required property"),
    (b"\xff\xfe", "not UTF-8 text (byte 0)"),
])
def test_broken_documents(text, expected):
    assert errors_of(text) == [expected]


def test_error_string_names_the_file():
    with pytest.raises(config.ConfigError) as info:
        config.loads("{}", "/etc/flyproxy/config.json")
    assert str(info.value) == "/etc/flyproxy/config.json: (top level): 'Apps' is a required property"


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


def test_cli_check_good():
    result = run_cli("check", "-c", str(REPO / "config.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK: 3 apps, 12 ports, 7 targets")


def test_cli_check_bad(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(doc(app(ports=[70000], targets=["x"])))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: Apps[0].Ports[0]: 70000 is greater than the maximum of 65535",
        f"{path}: Apps[0].Targets[0]: 'x': not host:port",
    ]
    assert "Traceback" not in result.stderr


# -- hostile input (found by an adversarial run): refused, bounded, quoted briefly ----------

@pytest.mark.parametrize("ports", ["[7401.0]", "[5.001e3]", "[7401e0]"])
def test_a_port_written_as_a_float_is_refused_even_when_integral(ports):
    text = '{"Apps": [{"Name": "a", "Ports": %s, "Targets": ["127.0.0.1:1"]}]}' % ports
    (error,) = errors_of(text)
    assert error.startswith("Apps[0].Ports[0]: ") and "is not of type 'integer'" in error


def test_an_integral_float_cannot_take_a_port_from_another_app():
    text = doc(app("a", [7401]), app("b", [7401.0]))
    assert any("Apps[1].Ports[0]" in e for e in errors_of(text))


@pytest.mark.parametrize("target", ["127.0.0.1:٩٠٠٠", "127.0.0.1:９０００", "host:9０"])
def test_a_target_port_takes_ascii_digits_only(target):
    (error,) = errors_of(doc(app(targets=[target])))
    assert "is not a number from 1 to 65535" in error


@pytest.mark.parametrize("name", ["a b", "\ud800x", "app/1", "-lead", "ünïcode", "x\n"])
def test_app_names_are_restricted_to_a_sane_set(name):
    (error,) = errors_of(json.dumps({"Apps": [app(name)]}))
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
    errors = errors_of(doc({**app(), "ProxyProtocol": "v3", "Balance": "round-robin",
                            "HealthCheck": {"Interval": 0, "Fall": 0, "Every": 3}}))
    assert errors == [
        "Apps[0].Balance: 'round-robin' is not one of ['random', 'least-connections']",
        "Apps[0].HealthCheck: Additional properties are not allowed ('Every' was unexpected)",
        "Apps[0].HealthCheck.Fall: 0 is less than the minimum of 1",
        "Apps[0].HealthCheck.Interval: 0 is less than or equal to the minimum of 0",
        "Apps[0].ProxyProtocol: 'v3' is not one of ['v1', 'v2']",
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
