"""Benchmark: what the gateway adds to time-to-first-token and relay rate, side by side with nginx, in one run.

Four targets in front of one deterministic SSE upstream (bench/sse_upstream.py: a role chunk at once, then 32
chunks 2 ms apart, like the reference measurements):

  direct   the upstream itself
  nginx    nginx with proxy_buffering off, HTTP/1.1 keep-alive to the upstream (the yardstick)
  floor    bench/tcp_relay.py: a byte-for-byte TCP relay on uvloop with no checks at all, the least any Python
           relay costs (gateway minus floor is the cost of the gateway's own work; floor minus nginx is Python's)
  gateway  clinic-edge gateway (plain HTTP on loopback, a real keys file and audit log)

Rounds alternate the targets (the order rotates every round) so that drift on a shared machine hits all alike.
For each concurrency level it prints TTFT p50/p99 (request sent → first SSE event with choices), the overhead over
direct, and the relay rate in chunks per second; then one request at a time carrying a 3 MB radiograph (a PNG).
It ends with the issue's goals and whether this run met them. Nothing here is asserted by the test suite.

    .venv/bin/python bench/bench_gateway.py [--rounds 5] [--levels 8,64] [--json]

nginx is required: apt-get install -y nginx (the benchmark only; the appliance does not use it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from appliance.processes import Interrupted, ManagedProcess

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CHAT = "/v1/chat/completions"
NGINX_CONF = """
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 16m;
    upstream vllm {{ server 127.0.0.1:{up_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://vllm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})  # noqa: S310
            with urllib.request.urlopen(req, timeout=2) as resp:  # noqa: S310 - a loopback http URL we built
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"bench: {url} did not answer 200 within {timeout:.0f} s")


@contextmanager
def process(argv: list[str], log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """A server for the bench; it and everything it spawned (nginx's workers) stop on leaving or on a signal."""
    with log.open("wb") as out, ManagedProcess(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd) as proc:
        yield proc.popen


def radiograph_png(target_bytes: int = 3_000_000) -> bytes:
    """A grayscale PNG of about ``target_bytes`` (noise, stored uncompressed-ish so the size is predictable)."""
    width = 2000
    height = target_bytes // (width + 1)
    rnd = os.urandom(width * height)
    raw = b"".join(b"\x00" + rnd[y * width : (y + 1) * width] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x00\x00\x00\x00"
    buf = io.BytesIO()
    buf.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))
    return buf.getvalue()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, int]:
    """(TTFT seconds, SSE events received) for one streamed request."""
    t0 = time.perf_counter()
    ttft = -1.0
    events = 0
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for data in resp.content.iter_any():
            if ttft < 0 and b'"choices":[{' in data:
                ttft = time.perf_counter() - t0
            events += data.count(b"data: ")
    return ttft, events


async def run_level(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], *, conc: int, per_worker: int
) -> tuple[list[float], int, float]:
    """``conc`` workers, each ``per_worker`` requests back to back: (TTFTs, events, wall seconds)."""
    ttfts: list[float] = []
    events = 0

    async def worker() -> None:
        nonlocal events
        for _ in range(per_worker):
            t, n = await one_request(session, url, body, headers)
            ttfts.append(t)
            events += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return ttfts, events, time.perf_counter() - t0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (nginx's workers), from /proc via psutil."""
    import psutil

    total = 0.0
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
    return total


async def bench(args: argparse.Namespace, targets: dict[str, str], key: str, pids: dict[str, int]) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(
        {"model": "bench-model", "messages": [{"role": "user", "content": "Describe tooth 36."}], "max_tokens": 32,
         "stream": True}
    ).encode()  # fmt: skip
    png = radiograph_png()
    import base64

    image_body = json.dumps(
        {"model": "bench-model", "max_tokens": 32, "stream": True,
         "messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
             {"type": "text", "text": "Findings?"}]}]}
    ).encode()  # fmt: skip
    levels = [int(x) for x in args.levels.split(",")]
    names = list(targets)
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        str(c): {n: {"ttft": [], "rate": [], "cpu_s": [0.0], "events": [0.0]} for n in names} for c in levels
    }
    image: dict[str, list[float]] = {n: [] for n in names}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        # Warm every path (connections, caches) before measuring.
        for url in targets.values():
            await run_level(session, url, body, headers, conc=8, per_worker=2)
            await one_request(session, url, image_body, headers)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for conc in levels:
                per_worker = max(2, args.requests // conc)
                for name in order:
                    cpu0 = cpu_seconds(pids[name])
                    ttfts, events, wall = await run_level(
                        session, targets[name], body, headers, conc=conc, per_worker=per_worker
                    )
                    row = results[str(conc)][name]
                    row["ttft"] += ttfts
                    row["rate"].append(events / wall)
                    row["cpu_s"][0] += cpu_seconds(pids[name]) - cpu0
                    row["events"][0] += events
            for name in order:
                for _ in range(args.image_requests):
                    t, _ = await one_request(session, targets[name], image_body, headers)
                    image[name].append(t)
            print(f"bench: round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    return {"levels": results, "image": image, "image_bytes": len(png)}


def report(raw: dict[str, object], names: list[str]) -> dict[str, object]:
    levels = raw["levels"]
    assert isinstance(levels, dict)
    summary: dict[str, object] = {}
    for conc, per in levels.items():
        rows = {}
        for name in names:
            ttft = [t * 1000 for t in per[name]["ttft"]]
            rows[name] = {
                "ttft_p50_ms": statistics.median(ttft),
                "ttft_p99_ms": pct(ttft, 99),
                "chunks_per_s": statistics.median(per[name]["rate"]),
                "cpu_us_per_chunk": per[name]["cpu_s"][0] / max(per[name]["events"][0], 1) * 1e6,
                "samples": len(ttft),
            }
        for name in names:
            rows[name]["overhead_p50_ms"] = rows[name]["ttft_p50_ms"] - rows["direct"]["ttft_p50_ms"]
            rows[name]["overhead_p99_ms"] = rows[name]["ttft_p99_ms"] - rows["direct"]["ttft_p99_ms"]
            if "nginx" in rows:
                rows[name]["rate_vs_nginx"] = rows[name]["chunks_per_s"] / rows["nginx"]["chunks_per_s"]
        summary[conc] = rows
    image = raw["image"]
    assert isinstance(image, dict)
    img = {n: {"ttft_p50_ms": statistics.median(v) * 1000, "samples": len(v)} for n, v in image.items()}
    for n in names:
        img[n]["added_p50_ms"] = img[n]["ttft_p50_ms"] - img["direct"]["ttft_p50_ms"]
    summary["image_3mb"] = img
    return summary


def print_report(summary: dict[str, object], names: list[str], image_bytes: int) -> None:
    for conc, rows in summary.items():
        if conc == "image_3mb":
            continue
        assert isinstance(rows, dict)
        print(f"\n{conc} concurrent streams (32 chunks, 2 ms apart)")
        print(
            f"  {'target':<8} {'TTFT p50':>9} {'p99':>8} {'+p50':>8} {'+p99':>8} {'chunks/s':>9} {'vs nginx':>8} "
            f"{'CPU/chunk':>10}"
        )
        for n in names:
            r = rows[n]
            print(
                f"  {n:<8} {r['ttft_p50_ms']:>8.2f}ms {r['ttft_p99_ms']:>6.2f}ms {r['overhead_p50_ms']:>+7.2f}ms "
                f"{r['overhead_p99_ms']:>+7.2f}ms {r['chunks_per_s']:>9.0f} {r.get('rate_vs_nginx', 0):>7.2f}x "
                f"{r['cpu_us_per_chunk']:>8.1f}us"
            )
        print("  (CPU/chunk: the target's own processes — the upstream for direct — per SSE event relayed)")
        if "baseline" in rows:
            g, b = rows["gateway"], rows["baseline"]
            print(
                f"  this checkout vs baseline: TTFT p50 {g['ttft_p50_ms'] - b['ttft_p50_ms']:+.2f} ms, "
                f"p99 {g['ttft_p99_ms'] - b['ttft_p99_ms']:+.2f} ms, "
                f"relay rate {g['chunks_per_s'] / b['chunks_per_s']:.3f}x"
            )
    img = summary["image_3mb"]
    assert isinstance(img, dict)
    print(f"\none request at a time with a {image_bytes / 1e6:.1f} MB PNG inline (TTFT p50)")
    for n in names:
        print(f"  {n:<8} {img[n]['ttft_p50_ms']:>8.2f}ms  added {img[n]['added_p50_ms']:>+6.2f}ms")


def goals(summary: dict[str, object]) -> list[tuple[str, bool, str]]:
    out = []
    s8 = summary.get("8")
    s64 = summary.get("64")
    if isinstance(s8, dict):
        g = s8["gateway"]["overhead_p50_ms"]
        out.append(("TTFT p50 overhead <= 0.5 ms at 8 streams", g <= 0.5, f"gateway {g:+.2f} ms, nginx "
                    f"{s8['nginx']['overhead_p50_ms']:+.2f} ms"))  # fmt: skip
    if isinstance(s64, dict):
        g, n = s64["gateway"], s64["nginx"]
        d50 = g["ttft_p50_ms"] - n["ttft_p50_ms"]
        d99 = g["ttft_p99_ms"] - n["ttft_p99_ms"]
        out.append(("64 streams: TTFT p50 within 1 ms of nginx", d50 <= 1.0, f"{d50:+.2f} ms"))
        out.append(("64 streams: TTFT p99 within 5 ms of nginx", d99 <= 5.0, f"{d99:+.2f} ms"))
        out.append(("64 streams: relay rate >= 0.95x nginx", g["rate_vs_nginx"] >= 0.95, f"{g['rate_vs_nginx']:.2f}x"))
    img = summary["image_3mb"]
    assert isinstance(img, dict)
    added = img["gateway"]["added_p50_ms"]
    out.append(("3 MB radiograph: <= 5 ms p50 added", added <= 5.0, f"{added:+.2f} ms (nginx "
                f"{img['nginx']['added_p50_ms']:+.2f} ms)"))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--levels", default="8,64", help="concurrency levels (default 8,64)")
    ap.add_argument("--requests", type=int, default=128, help="requests per target per level per round")
    ap.add_argument("--image-requests", type=int, default=6, help="3 MB image requests per target per round")
    ap.add_argument("--nginx-workers", default="1", help="nginx worker_processes (default 1, like the gateway)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout (e.g. git worktree add DIR HEAD~1) whose gateway runs as a further target, 'baseline', "
        "in the same alternating rounds: a code change measured side by side instead of across runs",
    )
    args = ap.parse_args()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        print("bench: nginx is not installed; install it for the comparison: apt-get install -y nginx", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        d = Path(tmp)
        up_port, ng_port, gw_port, base_port, floor_port = (free_port() for _ in range(5))
        (d / "nginx.conf").write_text(
            NGINX_CONF.format(workers=args.nginx_workers, dir=d, up_port=up_port, port=ng_port)
        )
        keys = d / "keys.json"
        out = subprocess.run(
            [PY, "-m", "appliance", "keys", "add", "bench", "--keys-file", str(keys)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        key = out.stdout.strip().splitlines()[-1]
        upstream = [PY, str(ROOT / "bench" / "sse_upstream.py"), "--port", str(up_port)]

        def gateway(port: int, name: str) -> list[str]:
            return [PY, "-m", "appliance", "gateway", "--upstream", f"http://127.0.0.1:{up_port}",
                    "--listen", f"127.0.0.1:{port}", "--keys-file", str(keys), "--audit-log", str(d / f"{name}.jsonl"),
                    "--max-inflight", "256", "--max-per-key", "256"]  # fmt: skip

        with contextlib.ExitStack() as stack:
            up_proc = stack.enter_context(process(upstream, d / "upstream.log"))
            ng_proc = stack.enter_context(
                process([nginx, "-c", str(d / "nginx.conf"), "-g", "daemon off;"], d / "nginx.log")
            )
            floor = [PY, str(ROOT / "bench" / "tcp_relay.py"), "--port", str(floor_port), "--upstream-port",
                     str(up_port)]  # fmt: skip
            floor_proc = stack.enter_context(process(floor, d / "floor.log"))
            gw_proc = stack.enter_context(process(gateway(gw_port, "gateway"), d / "gateway.log"))
            pids = {"direct": up_proc.pid, "nginx": ng_proc.pid, "floor": floor_proc.pid, "gateway": gw_proc.pid}
            targets = {
                "direct": f"http://127.0.0.1:{up_port}{CHAT}",
                "nginx": f"http://127.0.0.1:{ng_port}{CHAT}",
                "floor": f"http://127.0.0.1:{floor_port}{CHAT}",
                "gateway": f"http://127.0.0.1:{gw_port}{CHAT}",
            }
            if args.baseline:
                # ``python -m appliance`` run from the other checkout imports that checkout's package.
                base = stack.enter_context(process(gateway(base_port, "baseline"), d / "baseline.log", args.baseline))
                pids["baseline"] = base.pid
                targets["baseline"] = f"http://127.0.0.1:{base_port}{CHAT}"
            wait_http(f"http://127.0.0.1:{up_port}/health")
            wait_http(f"http://127.0.0.1:{ng_port}/health")
            wait_http(f"http://127.0.0.1:{floor_port}/health")
            for name in ("gateway", "baseline"):
                if name in targets:
                    wait_http(targets[name].removesuffix(CHAT) + "/readyz")
            try:
                import uvloop

                raw = uvloop.run(bench(args, targets, key, pids))
            except ImportError:
                raw = asyncio.run(bench(args, targets, key, pids))
    names = list(targets)
    summary = report(raw, names)
    verdicts = goals(summary)
    if args.json:
        print(json.dumps({"summary": summary, "goals": [{"goal": g, "met": m, "value": v} for g, m, v in verdicts]},
                         indent=2))  # fmt: skip
        return 0
    print(f"\nclinic-edge gateway benchmark: {args.rounds} alternating rounds, {os.cpu_count()} CPUs, "
          f"nginx workers {args.nginx_workers}, gateway 1 process")  # fmt: skip
    print_report(summary, names, int(raw["image_bytes"]))  # type: ignore[call-overload]
    print("\ngoals")
    for goal, met, value in verdicts:
        print(f"  [{'met' if met else 'MISSED'}] {goal}: {value}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Interrupted as stop:  # its servers are stopped; exit as the CLI does (143 SIGTERM, 130 Ctrl-C, 129 SIGHUP)
        sys.exit(stop.exit_code)
