"""The gateway under load and faults (``tests/run reliability``): the real gateway process in front of a fast fake
vLLM, loopback only, bounded loops, figures printed.

* 256 concurrent streams for 60 s: every stream's content exact, none lost, 429s only by policy and with
  Retry-After, the gateway's RSS and file descriptors back to their baseline afterwards;
* the upstream killed mid-stream: every workstation gets an SSE error event and the end of its answer within 1 s,
  ``/readyz`` is non-200 within 2 s, and the gateway recovers without a restart when vLLM is back;
* workstations dropping mid-stream: vLLM's connection for each is closed within 1 s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from appliance.keys import add_key
from tests.conftest import RunningGateway, free_port, launch_gateway
from tests.reliability.conftest import Outcome, expected_sse, stream_once
from tests.reliability.fake_vllm import FastVllm

STREAMS = 256
SECONDS = float(os.environ.get("CLINIC_EDGE_LOAD_SECONDS", "60"))
KEYS = 4  # 64 streams per key: within max_per_key, so a 429 here would be a fault, not the policy
CHUNKS = 8
GATEWAY_ARGS = ["--max-inflight", str(STREAMS), "--max-per-key", str(STREAMS // KEYS), "--upstream-keepalive-s", "1",
                "--stall-timeout-s", "4"]  # fmt: skip
POLICY_CODES = {"per_key_limit", "gateway_busy", "queue_full"}


def _readyz(gw: RunningGateway) -> int:
    try:
        with urllib.request.urlopen(gw.base_url + "/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _usage(gw: RunningGateway) -> tuple[int, int]:
    proc = psutil.Process(gw.process.pid)
    return int(proc.memory_info().rss), proc.num_fds()


async def _connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", int(gw.base_url.rsplit(":", 1)[1]), limit=1 << 20)


async def _worker(gw: RunningGateway, key: str, wid: int, until: float, seen: list[Outcome]) -> None:
    """Streams one request after another on one kept-alive connection until ``until``; checks each exactly."""
    reader, writer = await _connect(gw)
    n = 0
    try:
        while time.monotonic() < until:
            marker = f"w{wid}-r{n}"
            out = await stream_once(reader, writer, key, marker)
            seen.append(out)
            n += 1
            if out.status == 429:
                assert out.retry_after is not None and out.code in POLICY_CODES, out
                await asyncio.sleep(0.05)
                continue
            assert out.status == 200 and out.ended, out
            assert out.body == expected_sse(marker, CHUNKS), f"stream {marker} is not exact: {out.body[-200:]!r}"
    finally:
        writer.close()


async def _load(gw: RunningGateway, keys: list[str], seconds: float) -> list[Outcome]:
    seen: list[Outcome] = []
    until = time.monotonic() + seconds
    await asyncio.gather(*(_worker(gw, keys[i % len(keys)], i, until, seen) for i in range(STREAMS)))
    return seen


def _settled(gw: RunningGateway, baseline: tuple[int, int], timeout: float = 15.0) -> tuple[int, int]:
    """The gateway's (RSS, fds) once its fds are back to the baseline (idle upstream connections are closed after
    --upstream-keepalive-s), or whatever they are after ``timeout``."""
    deadline = time.monotonic() + timeout
    usage = _usage(gw)
    while usage[1] > baseline[1] and time.monotonic() < deadline:
        time.sleep(0.2)
        usage = _usage(gw)
    return usage


def test_256_streams_for_a_minute_are_exact_and_leave_no_trace(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FastVllm(chunks=CHUNKS, gap=0.002)
        port = free_port()
        await fake.start(port)
        loop = asyncio.get_running_loop()
        gw = await loop.run_in_executor(
            None, lambda: launch_gateway(tmp_path, [f"http://127.0.0.1:{port}"], extra_args=GATEWAY_ARGS, tls=False)
        )
        try:
            keys = [add_key(gw.keys_file, f"load-{i}") for i in range(KEYS)]
            await asyncio.sleep(0.1)  # the gateway re-reads the keys file on the next request
            idle_fds = _usage(gw)[1]
            await _load(gw, keys, 2.0)  # warm-up: allocator arenas at their peak once
            settled = await loop.run_in_executor(None, _settled, gw, (0, idle_fds))
            baseline = (settled[0], idle_fds)
            started = time.monotonic()
            seen = await _load(gw, keys, SECONDS)
            elapsed = time.monotonic() - started
            after = await loop.run_in_executor(None, _settled, gw, baseline)
        finally:
            gw.stop()
            fake.kill()
        ok = [o for o in seen if o.status == 200]
        limited = [o for o in seen if o.status == 429]
        ttfb = sorted(o.ttfb * 1000 for o in ok)
        print(f"\nload: {len(seen)} streams in {elapsed:.1f} s at {STREAMS} concurrent ({len(ok) / elapsed:.0f}/s, "
              f"{len(ok) * (CHUNKS + 3) / elapsed:.0f} chunks/s); exact {len(ok)}, 429 {len(limited)}, "
              f"other {len(seen) - len(ok) - len(limited)}; TTFB p50 {statistics.median(ttfb):.1f} ms, "
              f"p99 {ttfb[int(len(ttfb) * 0.99)]:.1f} ms; gateway RSS {baseline[0] / 2**20:.1f} -> "
              f"{after[0] / 2**20:.1f} MiB, fds {baseline[1]} -> {after[1]}; upstream started {fake.started}, "
              f"finished {fake.finished}")  # fmt: skip
        assert len(ok) + len(limited) == len(seen)  # none lost: every request got a whole answer or a policy 429
        assert not limited, "429s with room under every limit"
        assert fake.finished >= len(ok)  # (the warm-up's streams finished too)
        assert after[1] <= baseline[1], f"file descriptors {baseline[1]} -> {after[1]}"
        assert after[0] - baseline[0] < 32 * 2**20, f"RSS {baseline[0]} -> {after[0]}"

    asyncio.run(main())


def _start_fake_process(port: int, chunks: int, gap: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.fake_vllm", "--port", str(port), "--chunks", str(chunks),
         "--gap", str(gap)],
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the fake vLLM did not start")


def test_upstream_killed_mid_stream_ends_every_stream_and_recovers_without_restart(tmp_path: Path) -> None:
    port = free_port()
    fake = _start_fake_process(port, chunks=400, gap=0.01)  # 4 s streams: all are mid-answer at the kill
    gw = launch_gateway(tmp_path, [f"http://127.0.0.1:{port}"], extra_args=GATEWAY_ARGS, tls=False)
    pid = gw.process.pid
    try:

        async def streams() -> tuple[float, list[Outcome]]:
            conns = [await _connect(gw) for _ in range(32)]
            tasks = [asyncio.create_task(stream_once(r, w, gw.key, f"k{i}")) for i, (r, w) in enumerate(conns)]
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            fake.send_signal(signal.SIGKILL)
            outs = await asyncio.gather(*tasks)
            for _, w in conns:
                w.close()
            return killed, outs

        killed, outs = asyncio.run(streams())
        late = [o.times[-1] - killed for o in outs]
        for o in outs:
            assert o.status == 200 and o.ended, o
            events = o.body.split(b"\n\n")
            assert b'"code":"upstream_stream_failed"' in events[-3] and events[-2] == b"data: [DONE]", o.body[-300:]
        deadline = killed + 2.0
        while _readyz(gw) == 200 and time.monotonic() < deadline + 1:
            time.sleep(0.02)
        not_ready_after = time.monotonic() - killed
        fake.wait()
        fake = _start_fake_process(port, chunks=4, gap=0.001)
        back = time.monotonic()
        while _readyz(gw) != 200 and time.monotonic() < back + 15:
            time.sleep(0.1)
        recovered = time.monotonic() - back

        async def one() -> Outcome:
            r, w = await _connect(gw)
            try:
                return await stream_once(r, w, gw.key, "after")
            finally:
                w.close()

        after = asyncio.run(one())
        print(f"\nkill: {len(outs)} streams ended with an error event at most {max(late) * 1000:.0f} ms after the "
              f"kill; /readyz non-200 after {not_ready_after * 1000:.0f} ms; ready again {recovered:.1f} s after "
              f"vLLM came back")  # fmt: skip
        assert max(late) < 1.0
        assert not_ready_after < 2.0
        assert after.status == 200 and after.body == expected_sse("after", 4)
        assert gw.process.pid == pid and gw.process.poll() is None  # recovered without a restart
    finally:
        gw.stop()
        fake.kill()
        fake.wait()


def test_workstations_that_drop_mid_stream_close_their_upstream_connection(tmp_path: Path) -> None:
    async def main() -> None:
        fake = FastVllm(chunks=400, gap=0.01)
        port = free_port()
        await fake.start(port)
        loop = asyncio.get_running_loop()
        gw = await loop.run_in_executor(
            None, lambda: launch_gateway(tmp_path, [f"http://127.0.0.1:{port}"], extra_args=GATEWAY_ARGS, tls=False)
        )
        try:
            conns = [await _connect(gw) for _ in range(32)]
            tasks = [asyncio.create_task(stream_once(r, w, gw.key, f"d{i}")) for i, (r, w) in enumerate(conns)]
            while fake.started < 32 + 1:  # (+1: the readiness probe's generation)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            dropped = time.monotonic()
            for _, w in conns:
                w.transport.abort()
            await asyncio.gather(*tasks, return_exceptions=True)
            while len(fake.aborted) < 32 and time.monotonic() < dropped + 3:
                await asyncio.sleep(0.01)
        finally:
            await loop.run_in_executor(None, gw.stop)
            fake.kill()
        delays = [t - dropped for t in fake.aborted]
        print(f"\ndrop: vLLM saw {len(delays)} of 32 connections close, at most "
              f"{max(delays, default=0) * 1000:.0f} ms after the workstations left")  # fmt: skip
        assert len(delays) == 32 and max(delays) < 1.0

    asyncio.run(main())


pytestmark = pytest.mark.timeout(300)
