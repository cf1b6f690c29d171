"""The appliance in a booted Debian 12 container: its demo backends, connections into the
container's network namespace, and waits on systemd (test_systemd.py, test_package.py)."""

from __future__ import annotations

import json
import time

from container import Container
from helpers import TaggedBackend, connect, greet
from load import LoadGenerator

CONFIG = "/etc/flyproxy/config.json"


def wait_active(c: Container, unit: str, want: str = "active", timeout: float = 60) -> None:
    """Poll systemd for a unit's state (systemctl has no 'wait until active')."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = c.run(["systemctl", "show", "-P", "ActiveState", unit]).stdout.strip()
        if state == want:
            return
        if state == "failed":
            break
        time.sleep(0.2)  # polling systemd: `systemctl` cannot wait for a state
    journal = c.run(["journalctl", "-u", unit, "--no-pager", "-n", "60"], check=False).stdout
    raise AssertionError(f"{unit} is {state}, not {want}:\n{journal}")


class Appliance:
    def __init__(self, c: Container):
        self.c = c
        self.backends: dict[int, TaggedBackend] = {}

    def backend(self, tag: str, port: int) -> None:
        if port not in self.backends:
            with self.c.entered():
                self.backends[port] = TaggedBackend(tag, port)

    def configure(self, document: dict) -> None:
        for app in document["Apps"]:
            for target in app["Targets"]:
                host, port = target.rsplit(":", 1)
                if host == "127.0.0.1":
                    self.backend(app["Name"], int(port))
        self.c.write(CONFIG, json.dumps(document, indent=1))

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        return connect(port, host, timeout, namespace=self.c.entered)

    def greet(self, port: int, host: str = "127.0.0.1") -> str:
        return greet(port, host, namespace=self.c.entered)

    def load(self, ports: list[int]) -> LoadGenerator:
        gen = LoadGenerator(ports, namespace=self.c.entered, max_seconds=120)
        gen.start()
        assert gen.first_done.wait(10), "the load generator never completed a connection"
        return gen

    def main_pid(self) -> int:
        return int(self.c.run(["systemctl", "show", "-P", "MainPID", "flyproxy.service"]).stdout)

    def stop(self) -> None:
        for b in self.backends.values():
            b.stop()
