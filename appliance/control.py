"""The local control socket: a synchronous reload and a status view of the running proxy.

Protocol: one JSON object per line each way, one request per connection.
Requests are ``{"command": "reload"}`` and ``{"command": "status"}`` (and, from a
supervisor to its workers, ``{"command": "metrics"}``); every reply has ``"ok"`` and,
when it is false, ``"error"``. The socket is a Unix socket in
the service's runtime dir, reachable by root only (mode 0600).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)

DEFAULT_PATH = "/run/flyproxy/control.sock"
REQUEST_TIMEOUT_S = 30.0  # a reload binds ports and re-reads a file: seconds at most


class ControlError(Exception):
    pass


async def start(server: Server, path: str) -> asyncio.AbstractServer:
    if os.path.exists(path):
        os.unlink(path)  # left by a previous run; we own the runtime dir
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(lambda r, w: _handle(server, r, w), path)
    finally:
        os.umask(old)


async def _handle(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            writer.write(await _answer(server, await reader.readline()))
            await writer.drain()
    except (TimeoutError, ConnectionError) as e:
        log.warning("control connection: %s", e or type(e).__name__)
    finally:
        writer.close()


async def _answer(server: Server, line: bytes) -> bytes:
    """One request line -> one reply line."""
    try:
        command = json.loads(line)["command"]
    except (ValueError, KeyError, TypeError):
        reply = {"ok": False, "error": "expected a JSON line with a command"}
    else:
        reply = await server.handle_command(command)
    return json.dumps(reply).encode() + b"\n"


async def serve_channel(server: Server, sock: socket.socket) -> None:
    """Answer requests on a worker's channel to its supervisor (a socketpair, one JSON
    line each way per request, in order) until the supervisor closes it."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        while line := await reader.readline():
            writer.write(await _answer(server, line))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def reload_reply(ok: bool, message: str, generation: int, digest: str) -> dict:
    """The reply to ``reload``, from a single process or a supervisor alike."""
    reply = {"ok": ok, "message": message, "generation": generation, "digest": digest}
    if not ok:
        reply["error"] = message
    return reply


def request(path: str, command: str, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
    """Send one command to a running proxy and return its reply (blocking, bounded)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = b""
            deadline = time.monotonic() + timeout_s
            while not data.endswith(b"\n") and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise ControlError(f"{path}: no control socket (is the proxy running?)") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: no reply from the proxy") from None
