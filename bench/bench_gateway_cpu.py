"""Benchmark: the gateway's own Python cost per chat request, in-process, with no sockets.

A real ``Gateway`` and ``ClientConnection`` handle a streamed chat request whose bytes are fed to them directly; the
answer comes from a kept-alive ``UpstreamConnection`` fed the bytes ``sse_upstream.py`` would send (a role chunk,
``--chunks`` content chunks, usage and ``[DONE]``, one read each); the transports only count bytes. Every request
takes the whole path: parsing, key check, admission, validation, relay, metrics and the audit line (to a real file).
What is left out is the kernel and uvloop's reads and writes, so this is the part our code decides, measured without
the noise of a shared machine. ``bench_gateway.py`` measures the whole thing against nginx.

    .venv/bin/python bench/bench_gateway_cpu.py [--chunks 1] [--requests 5000] [--baseline DIR]

With ``--baseline DIR`` (another checkout, e.g. ``git worktree add /tmp/before HEAD~1``) both run in turns, each in
a process of its own, and it prints both medians and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _Transport:
    """Stands in for a socket: counts what is written, never blocks."""

    def __init__(self) -> None:
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written += sum(map(len, data))

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _measure(chunks: int, requests: int, repeats: int) -> list[float]:
    """Per-request CPU microseconds, one figure per repeat."""
    from appliance.gateway.app import Gateway
    from appliance.gateway.audit import AuditLog
    from appliance.gateway.config import GatewayConfig
    from appliance.gateway.http11 import ClientConnection
    from appliance.gateway.relay import UpstreamConnection
    from appliance.keys import add_key

    sys.path.insert(0, str(ROOT / "bench"))
    import sse_upstream as up_bytes

    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-cpu-"))
    key = add_key(tmp / "keys.json", "bench")
    url = "http://127.0.0.1:9"
    cfg = GatewayConfig(upstreams=[url], keys_file=tmp / "keys.json", audit_log=tmp / "audit.jsonl",
                        max_inflight=256, max_per_key=256)  # fmt: skip
    gateway = Gateway(cfg)
    gateway.audit = AuditLog(cfg.audit_log)
    client = ClientConnection(gateway.handle, cfg.max_body_bytes, set())
    client.connection_made(_Transport())  # type: ignore[arg-type]
    upstream = UpstreamConnection(url)
    upstream.connection_made(_Transport())  # type: ignore[arg-type]
    body = json.dumps({"model": up_bytes.MODEL, "messages": [{"role": "user", "content": "Describe tooth 36."}],
                       "max_tokens": 32, "stream": True}).encode()  # fmt: skip
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8443\r\nAuthorization: Bearer %b\r\n"
        b"Content-Type: application/json\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
        b"User-Agent: OpenAI/Python 1.0\r\nContent-Length: %d\r\n\r\n%b" % (key.encode(), len(body), body)
    )
    usage = up_bytes._event({"id": "x", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": chunks}})
    reads = [up_bytes.SSE_HEAD + up_bytes.ROLE, *[up_bytes.TOKEN] * (chunks - 1), up_bytes.LAST + usage + up_bytes.DONE]

    upstream.reusable = True
    gateway.conns.release(upstream)  # kept alive: every request takes it, and the gateway gives it back when done

    async def one() -> None:
        client.data_received(request)
        for data in reads:
            upstream.data_received(data)
        if client.task is not None:
            raise SystemExit("bench: the request did not finish; the bench is out of date with the gateway")
        await asyncio.sleep(0)  # one loop turn per request, as in the real gateway (the audit line is written then)

    for _ in range(200):
        await one()
    figures = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(requests):
            await one()
        figures.append((time.process_time() - t0) / requests * 1e6)
    gateway.audit.close()
    return figures


def _child(args: argparse.Namespace) -> None:
    import uvloop

    print(json.dumps(uvloop.run(_measure(args.chunks, args.requests, args.repeats))))


def _run(root: Path, args: argparse.Namespace) -> list[float]:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--chunks", str(args.chunks), "--requests",
         str(args.requests), "--repeats", str(args.repeats)],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [float(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=32, help="content chunks per answer (default 32; 1 isolates the "
                    "per-request cost)")  # fmt: skip
    ap.add_argument("--requests", type=int, default=5000, help="requests per figure (default 5000)")
    ap.add_argument("--repeats", type=int, default=5, help="figures per process (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per checkout, in turns (default 3)")
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="another checkout to compare, in the same run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return 0
    roots = {"this checkout": ROOT}
    if args.baseline:
        roots["baseline"] = args.baseline.resolve()
    figures: dict[str, list[float]] = {name: [] for name in roots}
    for rnd in range(args.rounds):
        for name, root in roots.items():
            figures[name] += _run(root, args)
        print(f"bench: round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\ngateway CPU per streamed chat request, in-process, content chunks per answer: {args.chunks} "
          f"({args.rounds} x {args.repeats} figures of {args.requests} requests each)")  # fmt: skip
    for name, values in figures.items():
        print(f"  {name:<14} median {statistics.median(values):7.1f} us   min {min(values):7.1f} us")
    if args.baseline:
        ratio = statistics.median(figures["this checkout"]) / statistics.median(figures["baseline"])
        print(f"  this checkout / baseline: {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
