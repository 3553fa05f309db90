"""What DICOM intake costs: conversion time, the TTFT it adds over the same image sent as PNG, and whether other
streams notice while conversions run. Not CI.

Two synthetic radiographs (no patient data; ``tests/unit/gateway/dicomgen.py``): a 2440×1292 16-bit panoramic
compressed as JPEG-LS, and a 3 MB uncompressed 12-bit intraoral. Their "PNG" twin is the image the gateway renders,
saved as a workstation would export it (Pillow, default compression).

1. ``convert_dicom`` in this process: median milliseconds per image.
2. A real gateway (``python -m appliance gateway``) in front of ``sse_upstream.py``: one stream at a time, PNG and
   DICOM requests alternating, TTFT medians and DICOM minus PNG (goal: ≤ 30 ms p50).
3. Eight text-only streams measured back to back, in alternating phases: alone, beside two clients sending the
   panoramic as PNG in a loop (the control), and beside two sending it as DICOM: their TTFT p50/p99 side by side
   (the conversions run in worker processes at a lower priority; the event loop should not notice them).

    .venv/bin/python -m bench.bench_dicom [--rounds 20] [--phase-s 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image
from pydicom import uid

from appliance.gateway.dicom import convert_dicom
from bench.bench_gateway import CHAT, PY, ROOT, free_port, one_request, pct, process, wait_http
from tests.unit.gateway.dicomgen import data_url, dicom_file, radiograph


def images() -> dict[str, tuple[bytes, bytes]]:
    """name: (DICOM file, the same image as an exported PNG)."""
    out = {}
    pano = dicom_file(radiograph(1292, 2440, 16), uid.JPEGLSLossless, bits_stored=16)
    intra = dicom_file(radiograph(1000, 1500, 12), uid.ExplicitVRLittleEndian)
    for name, data in (("panoramic 2440x1292 16-bit JPEG-LS", pano), ("intraoral 1500x1000 3 MB uncompressed", intra)):
        rendered = base64.b64decode(convert_dicom(base64.b64encode(data), 10**9).png_base64)
        png = io.BytesIO()
        Image.open(io.BytesIO(rendered)).save(png, "PNG")  # as a workstation exports it
        out[name] = (data, png.getvalue())
    return out


def body(url: str, text: str = "Findings?") -> bytes:
    content = [{"type": "image_url", "image_url": {"url": url}}] if url else []
    msg = {"role": "user", "content": [*content, {"type": "text", "text": text}]}
    return json.dumps({"model": "bench-model", "messages": [msg], "stream": True}).encode()


async def measure(url: str, key: str, imgs: dict[str, tuple[bytes, bytes]], rounds: int, phase_s: float) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    bodies = {
        name: (body(data_url(dicom)), body("data:image/png;base64," + base64.b64encode(png).decode()))
        for name, (dicom, png) in imgs.items()
    }
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        for dicom_body, png_body in bodies.values():  # warm-up: the first DICOM starts the worker processes
            for b in (dicom_body, png_body, dicom_body):
                await one_request(session, url, b, headers)
        print("\n2. TTFT through the gateway, one stream, PNG and DICOM alternating "
              f"({rounds} rounds; ms; p50)")  # fmt: skip
        print(f"   {'image':40s} {'PNG':>8s} {'DICOM':>8s} {'added':>8s} {'ratio':>6s}")
        for name, (dicom_body, png_body) in bodies.items():
            got: dict[str, list[float]] = {"png": [], "dicom": []}
            for _ in range(rounds):
                got["png"].append((await one_request(session, url, png_body, headers))[0] * 1000)
                got["dicom"].append((await one_request(session, url, dicom_body, headers))[0] * 1000)
            p, d = statistics.median(got["png"]), statistics.median(got["dicom"])
            print(f"   {name:40s} {p:8.1f} {d:8.1f} {d - p:+8.1f} {d / p:6.2f}  goal added <= 30 ms: "
                  f"{'met' if d - p <= 30 else 'MISSED'}")  # fmt: skip

        text_body = body("", "A short question without an image.")
        pano_dicom, pano_png = next(iter(bodies.values()))

        async def text_streams(stop: float, ttfts: list[float]) -> None:
            async def one() -> None:
                while time.perf_counter() < stop:
                    ttfts.append((await one_request(session, url, text_body, headers))[0] * 1000)

            await asyncio.gather(*(one() for _ in range(8)))

        async def senders(stop: float, image_body: bytes, done: list[int]) -> None:
            async def one() -> None:
                while time.perf_counter() < stop:
                    await one_request(session, url, image_body, headers)
                    done[0] += 1

            await asyncio.gather(*(one() for _ in range(2)))

        phases: dict[str, tuple[bytes | None, list[float], list[int]]] = {
            "no image requests": (None, [], [0]),
            "2 clients sending the PNG": (pano_png, [], [0]),
            "2 clients sending the DICOM": (pano_dicom, [], [0]),
        }
        for _ in range(max(2, rounds // 5)):
            for image_body, ttfts, done in phases.values():
                stop = time.perf_counter() + phase_s
                load = [senders(stop, image_body, done)] if image_body else []
                await asyncio.gather(text_streams(stop, ttfts), *load)
        print(f"\n3. Eight text streams' TTFT (ms) in alternating {phase_s:.0f} s phases, beside two clients sending "
              "the panoramic (as PNG: the control; as DICOM: converted)")  # fmt: skip
        print(f"   {'phase':30s} {'images':>6s} {'n':>6s} {'p50':>8s} {'p99':>8s}")
        for label, (_, values, done) in phases.items():
            print(f"   {label:30s} {done[0]:6d} {len(values):6d} {pct(values, 50):8.2f} {pct(values, 99):8.2f}")
        png_t, dicom_t = phases["2 clients sending the PNG"][1], phases["2 clients sending the DICOM"][1]
        print(f"   ratio DICOM/PNG phase: p50 {pct(dicom_t, 50) / pct(png_t, 50):.2f}, "
              f"p99 {pct(dicom_t, 99) / pct(png_t, 99):.2f}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="alternating PNG/DICOM rounds per image (default 20)")
    ap.add_argument("--phase-s", type=float, default=4.0, help="seconds per quiet/busy phase (default 4)")
    args = ap.parse_args()
    imgs = images()
    print(f"DICOM intake benchmark: {os.cpu_count()} CPUs")
    print("\n1. convert_dicom in-process (ms; median of 15)")
    for name, (dicom, png) in imgs.items():
        b64 = base64.b64encode(dicom)
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            convert_dicom(b64, 10**9)
            times.append((time.perf_counter() - t0) * 1000)
        decode = []
        for _ in range(15):  # what a PNG costs the model server to decode, for scale
            t0 = time.perf_counter()
            np.asarray(Image.open(io.BytesIO(png)))
            decode.append((time.perf_counter() - t0) * 1000)
        convert_ms, decode_ms = statistics.median(times), statistics.median(decode)
        print(f"   {name:40s} DICOM {len(dicom) / 1e6:5.2f} MB, PNG {len(png) / 1e6:5.2f} MB: convert "
              f"{convert_ms:6.1f} ms (PNG decode for scale {decode_ms:5.1f} ms)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp:
        d = Path(tmp)
        up_port, gw_port = free_port(), free_port()
        keys = d / "keys.json"
        out = subprocess.run([PY, "-m", "appliance", "keys", "add", "bench", "--keys-file", str(keys)],
                             capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
        key = out.stdout.strip().splitlines()[-1]
        gateway = [PY, "-m", "appliance", "gateway", "--upstream", f"http://127.0.0.1:{up_port}",
                   "--listen", f"127.0.0.1:{gw_port}", "--keys-file", str(keys), "--audit-log", str(d / "audit.jsonl"),
                   "--max-inflight", "256", "--max-per-key", "256"]  # fmt: skip
        with contextlib.ExitStack() as stack:
            stack.enter_context(process([PY, str(ROOT / "bench" / "sse_upstream.py"), "--port", str(up_port)],
                                        d / "upstream.log"))  # fmt: skip
            stack.enter_context(process(gateway, d / "gateway.log"))
            wait_http(f"http://127.0.0.1:{up_port}/health")
            wait_http(f"http://127.0.0.1:{gw_port}/readyz")
            asyncio.run(measure(f"http://127.0.0.1:{gw_port}{CHAT}", key, imgs, args.rounds, args.phase_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
