"""The local control socket: a synchronous reload and a status view of the running proxy.

Protocol: one JSON object per line each way, one request per connection.
Requests are ``{"command": "reload"}`` and ``{"command": "status"}`` (and, from a
supervisor to its workers, ``{"command": "metrics"}``); every reply has ``"ok"`` and,
when it is false, ``"error"``. The socket is a Unix socket in
the service's runtime dir, reachable by root only (mode 0600).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import socket
import stat
import time
from typing import Protocol

from ..settings import default_control


class Commands(Protocol):
    """What answers the control protocol: a single process's Server, or a Supervisor."""

    async def handle_command(self, command: str) -> dict: ...


log = logging.getLogger(__name__)


# Timeouts nest, outermost longest, so the innermost one that fails is the one reported:
# a supervisor waits up to RELOAD_TIMEOUT_S for a worker (workers.py), the control socket gives
# a request REQUEST_TIMEOUT_S, the CLI waits CLIENT_TIMEOUT_S for the reply.
# a reload binds ports, re-reads a file, resolves new names; an upgrade also tries the new
# code in a child and starts a generation of workers (seconds each on a slow VM)
REQUEST_TIMEOUT_S = 80.0
CLIENT_TIMEOUT_S = REQUEST_TIMEOUT_S + 5
CONNECT_TIMEOUT_S = 5.0  # the CLI waits this long for room in a full accept queue
LINE_LIMIT = 64 * 1024  # a request is one short JSON line; longer is answered with an error
# a worker's channel is trusted (its own supervisor) and carries configs (up to
# config.MAX_BYTES, escaped) and health check changes for thousands of targets
CHANNEL_LINE_LIMIT = 64 * 1024 * 1024


class ControlError(Exception):
    pass


# The control client whose request is being answered (its socket's fd): a supervisor that
# re-executes itself for an upgrade hands it to the new image, which answers it.
current_client: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "current_client", default=None)


def remove_stale(path: str) -> None:
    """Make way for our socket at ``path``: remove a socket a previous run left (nothing
    answers on it); refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens
        except OSError as e:  # a full backlog (EAGAIN) means somebody does
            raise ControlError(f"{path}: another process answers there ({e.strerror})") from None
        else:
            raise ControlError(f"{path}: another proxy is serving on it")
    os.unlink(path)


async def start(server: Commands, path: str,
                sock: socket.socket | None = None) -> asyncio.AbstractServer:
    """Serve the control socket at ``path``; or on ``sock``, the listening socket a
    previous image of this process bound there (a re-executed supervisor)."""
    if sock is not None:
        return await asyncio.start_unix_server(lambda r, w: _handle(server, r, w), sock=sock,
                                               limit=LINE_LIMIT)
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        if path != default_control() or os.path.dirname(directory) not in ("/run", "/tmp"):
            raise ControlError(f"--control {path}: the directory {directory} does not exist")
        os.makedirs(directory, mode=0o755, exist_ok=True)  # /run/flyproxy outside the unit
    remove_stale(path)
    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(lambda r, w: _handle(server, r, w), path,
                                               limit=LINE_LIMIT)
    except OSError as e:
        raise ControlError(f"--control {path}: {e.strerror}") from None
    finally:
        os.umask(old)


def remove(path: str) -> None:
    """Remove our control socket at a clean stop (a socket only: never anything else)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


async def _handle(server: Commands, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    current_client.set(sock.fileno() if sock is not None else None)
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            writer.write(await _answer(server, await _read_line(reader)))
            await writer.drain()
    except (TimeoutError, ConnectionError) as e:
        log.warning("control connection: %s", str(e) or type(e).__name__)
    finally:
        writer.close()


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    """One request line, or None if it is longer than the reader's limit (answered with an
    error)."""
    try:
        return await reader.readline()
    except ValueError:  # asyncio.LimitOverrunError, re-raised by readline() as ValueError
        return None


async def _answer(server: Commands, line: bytes | None) -> bytes:
    """One request line -> one reply line."""
    if line is None:
        reply = {"ok": False, "error": f"request longer than {LINE_LIMIT} bytes"}
    else:
        try:
            request = json.loads(line)
            command = request["command"]
            if not isinstance(command, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            reply = {"ok": False, "error": "expected a JSON line with a command"}
        else:
            try:
                reply = await server.handle_command(command)
            except Exception as e:  # a bug: answer it (a supervisor waiting on a silent
                log.exception("control command %r failed", command[:40])  # worker kills it)
                reply = {"ok": False, "error": f"internal error: {e!r}"}
            if "id" in request:  # a supervisor matches replies to its requests by id
                reply = {**reply, "id": request["id"]}
    return json.dumps(reply).encode() + b"\n"


def channel_from_fd(fd: int) -> socket.socket:
    """Adopt a worker's channel to its supervisor: the inherited end of a Unix stream
    socketpair (workers.py makes it)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ControlError(f"--worker-channel {fd}: not a socket: {e.strerror}") from None
    if sock.family != socket.AF_UNIX:
        raise ControlError(f"--worker-channel {fd}: not a Unix socket")
    sock.setblocking(False)
    return sock


async def serve_channel(server: Commands, sock: socket.socket,
                        running: set[asyncio.Task] | None = None) -> None:
    """Answer requests on a worker's channel to its supervisor (a socketpair, one JSON
    line each way, matched by id) until the supervisor closes it. Each request runs on its
    own, so a heartbeat is answered while a reload is still resolving names."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=CHANNEL_LINE_LIMIT)
    running = set() if running is None else running  # (the caller may wait for them)

    async def answer(line: bytes | None) -> None:
        try:
            writer.write(await _answer(server, line))  # one write per reply: no interleaving
            await writer.drain()
        except ConnectionError:
            pass  # the supervisor went away: the read loop sees it too

    try:
        while (line := await _read_line(reader)) != b"":
            task = asyncio.ensure_future(answer(line))
            running.add(task)
            task.add_done_callback(running.discard)
    except ConnectionError:
        pass
    finally:
        for task in running:
            task.cancel()
        writer.close()


def reload_reply(ok: bool, message: str, generation: int, digest: str) -> dict:
    """The reply to ``reload``, from a single process or a supervisor alike."""
    reply = {"ok": ok, "message": message, "generation": generation, "digest": digest}
    if not ok:
        reply["error"] = message
    return reply


def request(path: str, command: str, timeout_s: float = CLIENT_TIMEOUT_S) -> dict:
    """Send one command to a running proxy and return its reply (blocking, bounded)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            _connect(sock, path)
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
    except BlockingIOError:
        raise ControlError(f"{path}: the proxy's control socket is busy (its accept queue "
                           f"stayed full for {CONNECT_TIMEOUT_S:g}s)") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: no reply from the proxy") from None


def _connect(sock: socket.socket, path: str) -> None:
    """connect(), waiting (bounded) while the server's accept queue is full: a Unix socket
    answers that with EAGAIN at once instead of queueing the connect."""
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    pause = 0.01
    while True:
        try:
            return sock.connect(path)
        except BlockingIOError:
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)  # the accept queue is full: no event to wait on from here
            pause = min(pause * 2, 0.2)
