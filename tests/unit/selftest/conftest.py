"""A deterministic SSE upstream on loopback (bench/selftest_upstream.py) in a thread, for client and CLI tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.selftest_upstream import Upstream, serve


@dataclass
class RunningUpstream:
    url: str
    upstream: Upstream


def _start(upstream: Upstream) -> Iterator[RunningUpstream]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, asyncio.Server] = {}

    async def start() -> None:
        holder["server"] = await serve(upstream)
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert ready.wait(10)
    port = holder["server"].sockets[0].getsockname()[1]
    try:
        yield RunningUpstream(f"http://127.0.0.1:{port}", upstream)
    finally:

        async def stop() -> None:
            holder["server"].close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    """Ready upstream: first event after 15 ms, then 4 chunks 1 ms apart."""
    yield from _start(Upstream(first_delay=0.015, chunks=4, gap=0.001))


@pytest.fixture(scope="module")
def loading_upstream() -> Iterator[RunningUpstream]:
    """An upstream whose /readyz says 503 "vLLM is loading the model", like a gateway before vLLM is up."""
    yield from _start(Upstream(ready=False))
