"""Fixtures of the gateway's abuse battery and fuzzer: ``door`` is a real gateway (plain HTTP and TLS) in front of a
fake vLLM; see :mod:`tests.unit.gateway.door`."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from appliance.gateway.app import Gateway
from appliance.gateway.config import GatewayConfig
from appliance.gateway.server import serve
from appliance.keys import add_key
from appliance.tls import ensure_tls
from tests.conftest import free_port
from tests.unit.gateway.door import Door, FakeVllm

MAX_BODY = 1024 * 1024  # small, so that "over the limit" is cheap to send


async def start_gateway(
    config: Callable[[int], GatewayConfig], on_gateway: Callable[[Gateway], None] | None = None
) -> tuple[asyncio.Task[None], int]:
    """``serve(config(port))`` on a free port; returns its task and the port once it listens."""
    for _attempt in range(3):  # free_port() can lose its port to another socket before the gateway binds it
        port = free_port()
        started = asyncio.Event()
        task = asyncio.create_task(serve(config(port), started, on_gateway))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if started.is_set():
            return task, port
        if task.done() and isinstance(task.exception(), OSError):
            continue
        task.cancel()
        raise RuntimeError(f"the gateway did not start: {task.exception() if task.done() else 'timeout'}")
    raise RuntimeError("no free port for the gateway after 3 tries")


async def open_door(tmp_path: Path, *, tls: bool, **overrides: object) -> tuple[Door, asyncio.Task[None], object]:
    """Start a fake vLLM and a gateway in front of it; returns the door, the gateway's task and the upstream runner."""
    upstream = FakeVllm()
    up_port = free_port()
    runner = await upstream.start(up_port)
    keys = tmp_path / "keys.json"
    key = add_key(keys, "ws")
    client_ctx: ssl.SSLContext | None = None
    tls_kw: dict[str, object] = {}
    if tls:
        files = ensure_tls(tmp_path / "tls", ["localhost"], ["127.0.0.1"])
        tls_kw = {"tls_cert": files.server_cert, "tls_key": files.server_key}
        client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    holder: list[Gateway] = []

    def config(port: int) -> GatewayConfig:
        settings: dict[str, object] = {
            "upstreams": [f"http://127.0.0.1:{up_port}"], "listen": f"127.0.0.1:{port}", "keys_file": keys,
            "audit_log": tmp_path / "audit.jsonl", "health_interval_s": 0.2, "probe_interval_s": 1e9,
            "max_body_bytes": MAX_BODY, "max_per_key": 4, "queue_timeout_s": 2.0, **tls_kw, **overrides,
        }  # fmt: skip
        return GatewayConfig(**settings)  # type: ignore[arg-type]

    task, port = await start_gateway(config, holder.append)
    door = Door("127.0.0.1", port, client_ctx, key, keys, tmp_path / "audit.jsonl", holder[0], upstream)
    for _ in range(200):  # the health loop admits the upstream within one round
        if door.gateway.pool.upstreams[0].admitted and door.gateway.pool.upstreams[0].health_ok:
            break
        await asyncio.sleep(0.02)
    return door, task, runner


async def close_door(task: asyncio.Task[None], runner: object) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await runner.cleanup()  # type: ignore[attr-defined]


@pytest.fixture(params=["plain", "tls"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def door(tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Door]:
    """A gateway over plain HTTP and over TLS, with short connection timeouts (slow-loris cases stay fast)."""
    from appliance.gateway import http11

    monkeypatch.setattr(http11, "HEAD_TIMEOUT", 0.6)
    monkeypatch.setattr(http11, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(http11, "LINGER_TIMEOUT", 0.4)
    d, task, runner = await open_door(tmp_path, tls=transport == "tls")
    try:
        yield d
    finally:
        await close_door(task, runner)


@pytest_asyncio.fixture
async def plain_door(tmp_path: Path) -> AsyncIterator[Door]:
    """A gateway over plain HTTP only (cases where TLS adds nothing)."""
    d, task, runner = await open_door(tmp_path, tls=False)
    try:
        yield d
    finally:
        await close_door(task, runner)
