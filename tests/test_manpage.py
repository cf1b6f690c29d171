"""flyproxy(8): every command and every `serve` option documented, the sections an
operator looks for present, and troff that renders without a warning."""

from __future__ import annotations

import subprocess

from appliance.cli import build_parser
from appliance.cli.manpage import render
from appliance.settings import ServeConfig

SECTIONS = ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "SERVE OPTIONS", "CONFIGURATION",
            "SIGNALS", "FILES", "ENVIRONMENT", "EXIT STATUS", "EXAMPLES", "SEE ALSO")


def rendered() -> str:
    source = render(build_parser())
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=source,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no troff warning
    return subprocess.run(["col", "-bx"], input=out.stdout, capture_output=True, text=True,
                          timeout=60).stdout


def test_the_manual_has_every_section_command_and_option():
    text = rendered()
    for section in SECTIONS:
        assert f"\n{section}\n" in text, section
    for command in ("check", "serve", "reload", "status", "echo", "demo", "bpf load",
                    "bpf register", "bpf status", "bpf unload"):
        assert f"flyproxy {command}\n" in text, command
    for field in ServeConfig.options("serve", "global"):  # every option, by its flag
        flag = field.metadata["flag"]
        assert flag in text, flag
    for option in ("--new-workers", "--pin-dir", "--json", "--wait", "--control"):
        assert option in text, option
    for key in ("MaxConnections", "ProxyProtocol", "Balance", "HealthCheck"):
        assert key in text, key
    for field in ServeConfig.options("serve", "global"):  # ... and its variable
        if field.metadata["env"]:
            assert field.metadata["env"] in text, field.metadata["env"]
    assert "SIGHUP" in text and "SIGTERM" in text
