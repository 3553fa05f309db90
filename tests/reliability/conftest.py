"""Fixtures of the reliability tier: the real gateway process (``python -m appliance gateway``, uvloop) in front of
the fast fake vLLM (:mod:`tests.reliability.fake_vllm`), and a raw HTTP/1.1 streaming client."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from tests.reliability.fake_vllm import expected_events

__all__ = ["Outcome", "stream_once"]


@dataclass
class Outcome:
    """One streamed request as the workstation saw it."""

    status: int = 0
    retry_after: str | None = None
    code: str = ""
    body: bytes = b""  # the SSE bytes, unframed
    ended: bool = False  # the chunked answer reached its closing empty chunk
    ttfb: float = 0.0
    times: list[float] = field(default_factory=list)  # monotonic time of each chunk read


def request_bytes(key: str, marker: str) -> bytes:
    body = b'{"model":"fake","stream":true,"messages":[{"role":"user","content":"%b"}]}' % marker.encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer %b\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (key.encode(), len(body), body)
    )


async def stream_once(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str, marker: str, timeout: float = 30.0
) -> Outcome:
    """Send one streamed chat request on a kept-alive connection and read its whole answer."""
    out = Outcome()
    start = time.monotonic()
    writer.write(request_bytes(key, marker))

    async def read() -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        out.status = int(head[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
        out.retry_after = headers.get("retry-after")
        if "content-length" in headers:
            out.body = await reader.readexactly(int(headers["content-length"]))
            out.ended = True
            return
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            now = time.monotonic()
            if not out.times:
                out.ttfb = now - start
            out.times.append(now)
            if size == 0:
                out.ended = True
                return
            out.body += data[:-2]

    await asyncio.wait_for(read(), timeout)
    if out.status != 200 and out.body.startswith(b'{"error"'):
        out.code = str(json.loads(out.body)["error"]["code"])
    return out


def expected_sse(marker: str, chunks: int) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in expected_events(marker, chunks))
