"""The least a Python relay can cost: a byte-for-byte TCP relay on uvloop, for bench_gateway.py's "floor" row.

Each client connection gets its own upstream connection, and bytes pass both ways untouched, from one protocol
callback to the other transport's ``write`` (with back-pressure). No HTTP parsing, no key check, no validation, no
audit line: what is left is the event loop, the interpreter's call per read, and the kernel. The gap between this row
and nginx is what Python and uvloop cost by themselves; the gap between this row and the gateway is what the
gateway's own work costs.

    .venv/bin/python bench/tcp_relay.py --port 8081 --upstream-port 8000
"""

from __future__ import annotations

import argparse
import asyncio


class _Side(asyncio.Protocol):
    """One end; ``peer`` is the other end's transport (None until the upstream is connected)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.held: list[bytes] = []  # what arrived before the upstream connection was ready

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
        else:
            self.held.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()


class _Client(_Side):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, up = await asyncio.get_running_loop().create_connection(_Side, "127.0.0.1", self.upstream_port)
        except OSError:
            self.transport.close()
            return
        up.peer = self.transport
        self.peer = up.transport
        assert self.peer is not None
        if self.transport.is_closing():
            self.peer.close()
            return
        for data in self.held:
            self.peer.write(data)
        self.held = []


async def serve(port: int, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(upstream_port), "127.0.0.1", port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    ap.add_argument("--upstream-port", type=int, required=True, help="port of the upstream on 127.0.0.1")
    args = ap.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with the appliance's dependencies
        asyncio.run(serve(args.port, args.upstream_port))
        return
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()
