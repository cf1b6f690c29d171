"""``flyproxy demo``: the challenge's apps and ports, served offline by local echo targets.

It writes a demo config (the challenge's app names and ports; its ``tcp-echo.fly.dev``
targets replaced by echo servers on 127.0.0.1, and the deliberately bad target kept),
starts those echo servers, and runs the proxy in per-port mode in the foreground.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import config as configmod
from . import echo
from .service.server import Server
from .settings import ServeConfig

BAD_TARGET = "bad.target.for.testing:6003"  # never resolves; the proxy routes around it


def demo_document(echo_offset: int = 10000) -> dict:
    """The challenge's config with local targets: app port P's targets are 127.0.0.1:P+offset."""
    apps = []
    for name, base in (("five-thousand", 5000), ("six-thousand", 6000), ("seven-thousand", 7000)):
        targets = [f"127.0.0.1:{base + echo_offset + i}" for i in (1, 2)]
        if name == "six-thousand":
            targets.append(BAD_TARGET)
        apps.append({"Name": name, "Ports": [base + 1, base + 200, base + 300, base + 400],
                     "Targets": targets})
    return {"Apps": apps}


def echo_addresses(document: dict) -> list[tuple[str, int]]:
    """Every 127.0.0.1 target in ``document``: the echo servers it needs."""
    out = []
    for app in document["Apps"]:
        for text in app["Targets"]:
            target = configmod.Target.parse(text)
            if target.host == "127.0.0.1":
                out.append((target.host, target.port))
    return out


async def run(workdir: str | None = None, host: str = "127.0.0.1") -> int:
    made = workdir is None  # a temporary directory of our own: removed when the demo stops
    directory = Path(workdir or tempfile.mkdtemp(prefix="flyproxy-demo-"))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        document = demo_document()
        path.write_text(json.dumps(document, indent=2) + "\n")
        config = configmod.load(path)
        await echo.start(echo_addresses(document))
        server = Server(config, ServeConfig(config=str(path), host=host, grace_period_s=2.0))
        print(f"""
flyproxy demo: {config.summary()}, echo targets on 127.0.0.1:15001-17002
config: {path}{" (removed when the demo stops)" if made else ""}

Try it from another terminal:
    echo hello | nc -N {host} 6300          # six-thousand; bad.target.for.testing is routed around
    echo hello | nc -N {host} 5001          # five-thousand
Hot reload: edit {path}, then
    kill -HUP {os.getpid()}
Ctrl-C stops (a second Ctrl-C closes open connections at once).
""", flush=True)
        return await server.serve()
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
