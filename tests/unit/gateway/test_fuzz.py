"""Generated requests against the real gateway process (``python -m appliance gateway``, uvloop) in front of a fake
vLLM that refuses anything but standard JSON: at least 10,000 per run, none answered 5xx, no traceback on the wire,
nothing held after each batch (read from ``/metrics``), and the gateway's resident memory flat. What is generated:
see :mod:`tests.unit.gateway.strategies` (shaped by docs/openapi.yaml).

The gateway runs in its own process so that its memory is measured apart from Hypothesis's (which grows with every
example it remembers); the fake vLLM and the clients run on this test's loop, Hypothesis in a worker thread."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import uvloop
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningGateway, free_port, launch_gateway
from tests.unit.gateway.conftest import MAX_BODY
from tests.unit.gateway.door import FakeVllm, Response, read_response
from tests.unit.gateway.strategies import HEAD_ONLY, http_requests

T = TypeVar("T")
BATCH = 25  # requests per generated example, sent concurrently, each on its own connection
EXAMPLES = int(os.environ.get("CLINIC_EDGE_FUZZ_EXAMPLES", "420"))  # 420 x 25 = 10,500 requests
WARM_UP = 40  # examples before the first memory reading
RSS_GROWTH_LIMIT = 16 * 1024 * 1024  # a leak of one small body per request would pass this within the run
_HELD = re.compile(rb"^clinic_edge_gateway_(inflight_requests|waiting_requests|upstream_inflight)\S* (\S+)$", re.M)


@dataclass
class Target:
    """The gateway process under test and the loop its clients run on."""

    loop: asyncio.AbstractEventLoop
    port: int
    gateway: RunningGateway

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the clients' loop from Hypothesis's thread."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    async def send(self, raw: bytes) -> Response | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        try:
            writer.write(raw)
            if raw.startswith(HEAD_ONLY):  # the answer to HEAD has a content-length and no body
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                return Response(int(head.split(b" ")[1]), {}, b"")
            resp = await read_response(reader)
            while resp is not None and resp.status == 100:  # Expect: 100-continue
                resp = await read_response(reader)
            return resp
        except (ConnectionResetError, asyncio.IncompleteReadError):
            return None
        finally:
            writer.close()

    async def batch(self, batch: list[bytes]) -> list[Response | None]:
        return list(await asyncio.gather(*(self.send(raw) for raw in batch)))

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait until the gateway holds nothing (admission slots, waiters, replica counts); fail otherwise."""
        deadline = self.loop.time() + timeout
        held: list[tuple[bytes, bytes]] = []
        while self.loop.time() < deadline:
            resp = await self.send(b"GET /metrics HTTP/1.1\r\nhost: gw\r\n\r\n")
            assert resp is not None and resp.status == 200
            held = [(name, value) for name, value in _HELD.findall(resp.body) if float(value) != 0]
            if not held:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the gateway still holds: {held}")

    def rss(self) -> int:
        return int(psutil.Process(self.gateway.process.pid).memory_info().rss)


def test_generated_requests_get_no_5xx_and_leave_nothing_behind(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        upstream = FakeVllm()
        up_port = free_port()
        runner = await upstream.start(up_port)
        extra = ["--max-body-bytes", str(MAX_BODY), "--max-per-key", "8", "--probe-interval-s", "1e9"]
        gateway = await loop.run_in_executor(
            None,
            lambda: launch_gateway(
                tmp_path, [f"http://127.0.0.1:{up_port}"], extra_args=extra, tls=False, wait_ready=False
            ),
        )
        try:
            port = int(gateway.base_url.rsplit(":", 1)[1])
            await loop.run_in_executor(None, _fuzz, Target(loop, port, gateway))
        finally:
            gateway.stop()
            await runner.cleanup()

    uvloop.run(main())


def _fuzz(target: Target) -> None:
    statuses: Counter[int | None] = Counter()
    rss: list[int] = []
    examples = [0]
    started = time.monotonic()
    requests = http_requests(target.gateway.key)

    # Generation only: a failure's message quotes the request that caused it, which is what shrinking would find.
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(data=st.data())
    def one_batch(data: st.DataObject) -> None:
        batch = data.draw(st.lists(requests, min_size=BATCH, max_size=BATCH), label="batch")
        responses = target.run(target.batch(batch))
        for raw, resp in zip(batch, responses, strict=True):
            statuses[resp.status if resp else None] += 1
            if resp is None or raw.split(b" ", 2)[1] == b"/readyz":  # 503 there means "not ready", by design
                continue
            assert resp.status < 500, (resp.status, resp.body[:400], raw[:400])
            assert b"Traceback" not in resp.body
        target.run(target.settle())
        examples[0] += 1
        if examples[0] == WARM_UP:
            rss.append(target.rss())

    one_batch()
    rss.append(target.rss())
    total = sum(statuses.values())
    elapsed = time.monotonic() - started
    print(f"\nfuzz: {total} requests in {elapsed:.1f} s; statuses {dict(sorted(statuses.items(), key=str))}; "
          f"gateway RSS {rss[0] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB")  # fmt: skip
    assert total >= EXAMPLES * BATCH
    assert statuses[200] > total // 50, "too few generated requests reach vLLM to test the relay"
    assert rss[-1] - rss[0] < RSS_GROWTH_LIMIT
