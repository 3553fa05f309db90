"""A fast OpenAI-style SSE upstream for the reliability tier (raw asyncio, not vLLM), in-process or as a process.

``POST /v1/chat/completions`` streams a role chunk, ``chunks`` content chunks ``gap`` seconds apart, each naming the
request's first message (``<marker> <i>``, so a client can check that it got its own stream, exactly), a usage chunk
and ``[DONE]``, in chunked framing like vLLM. ``/health`` and ``/v1/models`` answer like vLLM's. It records when
each chat request's connection closed (vLLM aborts a generation when its client leaves).

    python -m tests.reliability.fake_vllm --port 18000 [--chunks 8] [--gap 0.002]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

__all__ = ["FastVllm", "expected_events"]


def expected_events(marker: str, chunks: int) -> list[bytes]:
    """The SSE ``data`` payloads of one answer, as the fake sends them."""
    out = [b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}']
    out += [json.dumps({"choices": [{"index": 0, "delta": {"content": f"{marker} {i} "}}]},
                       separators=(",", ":")).encode() for i in range(chunks)]  # fmt: skip
    out.append(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":%d}}' % chunks)
    out.append(b"[DONE]")
    return out


def _chunk(data: bytes) -> bytes:
    event = b"data: " + data + b"\n\n"
    return b"%x\r\n%b\r\n" % (len(event), event)


class _Conn(asyncio.Protocol):
    def __init__(self, owner: FastVllm) -> None:
        self.owner = owner
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.chat = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.conns.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
            self.owner.aborted.append(time.monotonic())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + length], self.buf[end + 4 + length :]
            self._answer(head[0].split(" ")[1], body)

    def _answer(self, path: str, body: bytes) -> None:
        assert self.transport is not None
        if path == "/v1/chat/completions":
            req = json.loads(body)
            marker = str(req["messages"][0]["content"])
            self.owner.started += 1
            self.task = asyncio.get_running_loop().create_task(self._stream(marker))
            return
        doc = {"object": "list", "data": [{"id": "fake", "object": "model"}]} if path == "/v1/models" else {}
        out = json.dumps(doc).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (len(out), out))  # fmt: skip

    async def _stream(self, marker: str) -> None:
        assert self.transport is not None
        events = expected_events(marker, self.owner.chunks)
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                             b"\r\n" + _chunk(events[0]))  # fmt: skip
        for event in events[1:-1]:
            await asyncio.sleep(self.owner.gap)
            self.transport.write(_chunk(event))
        self.transport.write(_chunk(events[-1]) + b"0\r\n\r\n")
        self.owner.finished += 1


class FastVllm:
    """The fake; :meth:`start` listens on ``port``; :meth:`kill` drops every connection at once (a crash)."""

    def __init__(self, chunks: int = 8, gap: float = 0.002) -> None:
        self.chunks = chunks
        self.gap = gap
        self.conns: set[_Conn] = set()
        self.aborted: list[float] = []  # when a chat request's connection closed before its answer ended
        self.started = 0
        self.finished = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", port, backlog=1024)

    def kill(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--gap", type=float, default=0.002)
    args = ap.parse_args()

    async def run() -> None:
        fake = FastVllm(args.chunks, args.gap)
        await fake.start(args.port)
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(run())


if __name__ == "__main__":
    main()
