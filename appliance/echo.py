"""A small TCP echo backend for demos and tests: what it reads it writes back.

It honours half-close: when the client shuts down its write side, the echo
finishes writing and then closes its own.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # asyncio closes the transport once the write buffer drains

    # Backpressure: stop reading while the client is not reading our echo.
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def start(addresses: list[tuple[str, int]]) -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for host, port in addresses:
        servers.append(await loop.create_server(Echo, host, port, reuse_address=True,
                                                backlog=4096))
        log.info("echo listening on %s:%d", host, port)
    return servers


async def serve(addresses: list[tuple[str, int]]) -> None:
    servers = await start(addresses)
    try:
        await asyncio.gather(*(s.serve_forever() for s in servers))
    finally:
        for s in servers:
            s.close()
