"""A deterministic OpenAI-style SSE upstream on loopback: first event after a known delay, then chunks at fixed gaps.

A raw asyncio HTTP/1.1 server (keep-alive, chunked transfer encoding, like uvicorn's): no framework between the socket
and the timer, so the server's own cost is tiny and measured. For every request it records its own clock readings
(``time.perf_counter``, which is CLOCK_MONOTONIC on Linux and so shared by processes on one machine), keyed by the
first message's content and served at ``GET /truth``:

* when the request had been read completely, and
* just before the first event was written,

so a client can split its measured TTFT into the true server delay (the difference) and its own overhead.

Run as a script (``python -m bench.selftest_upstream --port P``) or start in-process with :func:`serve`. Modes,
chosen per request with the ``x-mode`` header or the model name: ``ok`` (default), ``error-mid`` (an error event after
the first chunk), ``empty`` (200 with only ``[DONE]``), ``cut`` (the connection closes mid-stream), ``503``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}


def _event(obj: object) -> bytes:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _content(i: int, last: bool) -> bytes:
    choice = {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": "length" if last else None}
    return _event({"choices": [choice]})


DONE = b"data: [DONE]\n\n"
DONE_CHUNK = b"%x\r\n%s\r\n" % (len(DONE), DONE)
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


class Upstream:
    """Server settings: first-event delay, chunk count and gap (seconds)."""

    def __init__(self, first_delay: float = 0.020, chunks: int = 16, gap: float = 0.002, *, ready: bool = True) -> None:
        self.ready = ready  # False: answer /readyz like a gateway whose vLLM is still loading
        self.first_delay = first_delay
        self.chunks = chunks
        self.gap = gap
        self.connections = 0  # accepted so far (tests check that connections are reused)
        self._chunks = [_content(i, i == chunks - 1) for i in range(chunks)]  # encoded once: the server stays cheap
        # The truth, keyed by the first message's content: (request read, first event written), perf_counter seconds.
        self.truth: dict[str, tuple[float, float]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one keep-alive connection until the client closes it."""
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                mode = "ok"
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                    if name.strip().lower() == b"x-mode":
                        mode = value.strip().decode()
                body = await reader.readexactly(length) if length else b""
                recv = time.perf_counter()
                if head.startswith(b"GET /v1/models"):
                    payload = json.dumps({"data": [{"id": "upstream", "max_model_len": 4096}]}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
                    continue
                if head.startswith(b"GET /truth"):
                    payload = json.dumps(self.truth).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
                    continue
                if head.startswith(b"GET /readyz") and not self.ready:
                    payload = json.dumps({"ready": False, "reasons": ["vLLM is loading the model"]}).encode()
                    writer.write(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload)
                    )
                    continue
                if head.startswith(b"GET /health"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                if head.startswith(b"GET "):
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    continue
                key = ""
                with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, AttributeError):
                    req = json.loads(body)
                    mode = req.get("model", mode) if mode == "ok" else mode
                    content = req["messages"][0]["content"]
                    key = str(content[0]["text"] if isinstance(content, list) else content)
                if mode not in ("ok", "error-mid", "empty", "cut", "503"):
                    mode = "ok"
                if not await self._respond(writer, mode, recv, key):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, mode: str, recv: float, key: str) -> bool:
        if mode == "503":
            msg = b'{"error":{"message":"not ready","type":"server_error","code":"not_ready"}}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\n\r\n%s" % (len(msg), msg))
            return True
        writer.write(HEAD)
        if mode == "empty":
            writer.write(DONE_CHUNK + b"0\r\n\r\n")
            return True
        await asyncio.sleep(max(0.0, recv + self.first_delay - time.perf_counter()))
        sent = time.perf_counter()
        writer.write(_event(ROLE))
        self.truth[key] = (recv, sent)
        for i in range(self.chunks):
            await asyncio.sleep(self.gap)
            writer.write(self._chunks[i])
            if mode == "error-mid" and i == 0:
                writer.write(_event({"error": {"message": "synthetic failure", "type": "server_error", "code": 500}}))
                break
            if mode == "cut" and i == 1:
                await writer.drain()
                return False
        usage = {"prompt_tokens": 16, "completion_tokens": self.chunks, "total_tokens": 16 + self.chunks}
        writer.write(_event({"choices": [], "usage": usage}) + DONE_CHUNK + b"0\r\n\r\n")
        await writer.drain()
        return True


async def serve(upstream: Upstream, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start listening; the caller owns the returned server (``close()`` it)."""
    return await asyncio.start_server(upstream.handle, host, port, backlog=512)


def main() -> None:
    """Serve until killed; prints ``READY <port>`` once listening."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--first-delay-ms", type=float, default=20.0)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--gap-ms", type=float, default=2.0)
    args = ap.parse_args()

    async def run() -> None:
        server = await serve(Upstream(args.first_delay_ms / 1000, args.chunks, args.gap_ms / 1000), port=args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"READY {port}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
