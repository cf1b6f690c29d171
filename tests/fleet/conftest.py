"""Every test here boots containers (make check leaves them out); the fixture is
fleet_lab.fleet_of."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/fleet" in str(item.fspath):
            item.add_marker(pytest.mark.systemd)
