"""A deterministic, lean OpenAI-style SSE upstream for benchmarks (not vLLM): raw asyncio on uvloop.

``POST /v1/chat/completions`` answers with a role chunk at once, then ``--chunks`` content chunks ``--gap-ms`` apart,
a usage chunk and ``data: [DONE]`` (chunked transfer encoding, one HTTP chunk per event, like vLLM). It reads and
discards any request body (so a 4 MB image request costs it only the copy). ``/health`` and ``/v1/models`` answer
like vLLM's so the gateway admits it.

    python bench/sse_upstream.py --port 18000 [--chunks 32] [--gap-ms 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json

MODEL = "bench-model"


def _event(obj: object) -> bytes:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    return _event(
        {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    )  # fmt: skip


ROLE = _chunk({"role": "assistant", "content": ""})
TOKEN = _chunk({"content": "tok "})
LAST = _chunk({"content": "tok"}, "length")
DONE = b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"


def _json_response(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
MODELS = _json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


class Upstream(asyncio.Protocol):
    """One connection: parse requests (keep-alive), answer them in order."""

    def __init__(self, chunks: int, gap: float) -> None:
        self.chunks = chunks
        self.gap = gap
        self.buf = bytearray()
        self.need: int | None = None  # body bytes still to skip
        self.head: bytes = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transport is not an asyncio subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._parse()

    def _parse(self) -> None:
        while True:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                length = 0
                for line in self.head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.need = length
            if len(self.buf) < self.need:
                return
            del self.buf[: self.need]
            self.need = None
            self._answer(self.head.split(b" ", 2))

    def _answer(self, request_line: list[bytes]) -> None:
        assert self.transport is not None
        method, path = request_line[0], request_line[1]
        if method == b"POST" and path == b"/v1/chat/completions":
            asyncio.get_running_loop().create_task(self._stream())
        elif path == b"/health":
            self.transport.write(HEALTH)
        elif path == b"/v1/models":
            self.transport.write(MODELS)
        else:
            self.transport.write(NOT_FOUND)

    async def _stream(self) -> None:
        t = self.transport
        assert t is not None
        t.write(SSE_HEAD + ROLE)
        for i in range(self.chunks):
            await asyncio.sleep(self.gap)
            if t.is_closing():
                return
            t.write(LAST if i == self.chunks - 1 else TOKEN)
        t.write(DONE)


async def serve(port: int, chunks: int, gap: float) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(chunks, gap), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Command line entry."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    args = ap.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.chunks, args.gap_ms / 1000))


if __name__ == "__main__":
    main()
