"""The delivery files themselves: the Ansible role lints clean, the Vagrantfile validates."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from helpers import REPO


@pytest.mark.skipif(not shutil.which("ansible-lint"), reason="needs ansible-lint")
def test_ansible_lint_production_profile_is_clean():
    result = subprocess.run(["ansible-lint", "--offline", "--profile", "production", "--nocolor"],
                            cwd=REPO / "ansible", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed with production profile" in result.stdout + result.stderr


@pytest.mark.skipif(not shutil.which("ansible-playbook"), reason="needs ansible-core")
def test_playbook_syntax():
    result = subprocess.run(["ansible-playbook", "--syntax-check", "site.yml"],
                            cwd=REPO / "ansible", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not shutil.which("vagrant"), reason="needs vagrant")
def test_vagrantfile_validates():
    # The box cannot be downloaded here and no VM provider runs here: validate the
    # Vagrantfile offline, without provider-specific options.
    result = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": "/root",
                                              "VAGRANT_CHECKPOINT_DISABLE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully" in result.stdout
