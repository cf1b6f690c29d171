"""Under CI=true a skip fails the run unless tests/conftest.py's ALLOWED_SKIPS names its
reason; outside CI a skip stays a skip. Checked on a real pytest run (a subprocess) over a
generated test file next to a copy of the project's conftest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

GENERATED = '''
import pytest
from conftest import ALLOWED_SKIPS

def test_plain_skip():
    pytest.skip("needs a unicorn")

@pytest.mark.skipif(True, reason="needs a marked unicorn")
def test_skipif_mark():
    pass

def test_opted_out():
    pytest.skip("FLYPROXY_VM_TEST=0")

def test_allowed_skip():
    pytest.skip(next(iter(ALLOWED_SKIPS)) + " 12000 (a capped container)")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    assert True
'''

MODULE_SKIP = '''
import pytest
pytest.skip("no unicorn here", allow_module_level=True)
'''


def run(tmp_path: Path, ci: str | None, body: str = GENERATED) -> subprocess.CompletedProcess:
    (tmp_path / "test_generated.py").write_text(body)
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(TESTS)  # the conftest imports helpers
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra",
                           "-o", "addopts=", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def lines(out: str, prefix: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(prefix)]


def test_under_ci_only_allowed_skips_pass(tmp_path):
    result = run(tmp_path, "true")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    failed = lines(out, "FAILED ") + lines(out, "ERROR ")
    assert sorted(ln.split()[1].split("::")[1] for ln in failed) == \
        ["test_opted_out", "test_plain_skip", "test_skipif_mark"], out
    assert "this one said: needs a unicorn" in out
    assert "this one said: needs a marked unicorn" in out
    # the allowed one stays a skip, printed in the summary with its reason
    skipped = lines(out, "SKIPPED ")
    assert len(skipped) == 1 and "a capped container" in skipped[0], out
    assert "CI=true: a skip fails the run unless its reason starts with" in out
    assert "1 xfailed" in out and "1 passed" in out


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    result = run(tmp_path, None)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert len(lines(out, "SKIPPED ")) == 4, out
    assert "FLYPROXY_VM_TEST=0" in out and "CI=true:" not in out


def test_under_ci_a_module_level_skip_fails(tmp_path):
    result = run(tmp_path, "true", MODULE_SKIP)
    assert result.returncode != 0, result.stdout
    assert "this one said: no unicorn here" in result.stdout
    outside = run(tmp_path, "false", MODULE_SKIP)
    assert outside.returncode == 5 and "1 skipped" in outside.stdout, outside.stdout  # 5: no tests
