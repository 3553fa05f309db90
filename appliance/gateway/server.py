"""Run the gateway: listen (TLS or loopback HTTP), serve until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from collections.abc import Callable

from appliance.gateway.app import Gateway
from appliance.gateway.config import GatewayConfig
from appliance.gateway.http11 import ClientConnection, cancel_all, watch_deadlines

__all__ = ["run", "serve"]

DRAIN_SECONDS = 30.0


def _ssl_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def serve(
    cfg: GatewayConfig, started: asyncio.Event | None = None, on_start: Callable[[Gateway], None] | None = None
) -> None:
    """Serve until SIGTERM or SIGINT (or cancellation); ``on_start`` is given the gateway once it listens (tests read
    its admission counters)."""
    gateway = Gateway(cfg)
    await gateway.startup()
    loop = asyncio.get_running_loop()
    connections: set[ClientConnection] = set()
    try:
        server = await loop.create_server(
            lambda: ClientConnection(gateway.handle, cfg.max_body_bytes, connections, head=gateway.check_head),
            cfg.host,
            cfg.port,
            ssl=_ssl_context(cfg),
            backlog=1024,
            reuse_address=True,
        )
    except BaseException:
        await gateway.shutdown()  # the audit log and the health loop's session, opened above
        raise
    deadlines = asyncio.create_task(watch_deadlines(connections), name="clinic-edge-connection-deadlines")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if cfg.tls_cert else "http"
    sys.stderr.write(
        f"clinic-edge gateway: listening on {scheme}://{cfg.listen} -> {', '.join(cfg.upstreams)} "
        f"({len(gateway.keys)} workstation keys)\n"
    )
    sys.stderr.flush()
    if on_start is not None:
        on_start(gateway)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        server.close()
        deadline = loop.time() + DRAIN_SECONDS
        while any(c.task is not None for c in connections) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        deadlines.cancel()
        cancel_all(connections)
        await gateway.shutdown()


def run(cfg: GatewayConfig) -> None:
    """Run :func:`serve` on uvloop (asyncio's loop when uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; without its wheel the gateway still runs
        asyncio.run(serve(cfg))
        return
    uvloop.run(serve(cfg))
