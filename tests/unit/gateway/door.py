"""The gateway under attack, for the battery and the fuzzer: a real gateway (plain or TLS) in front of a fake vLLM
that records every request it receives, raw-socket helpers, and the checks every case ends with."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from appliance.gateway.app import Gateway

__all__ = ["EVENTS", "Door", "FakeVllm", "Response", "chat_body", "read_response"]

EVENTS = [
    b'{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    *[b'{"choices":[{"index":0,"delta":{"content":"t%d "}}]}' % i for i in range(8)],
    b'{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":8,"total_tokens":15}}',
]


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


@dataclass
class FakeVllm:
    """An OpenAI-style upstream. ``seen`` holds (method, path) of every request other than the health loop's."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    aborted: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # "hold" requests wait for it

    async def start(self, port: int) -> web.AppRunner:
        @web.middleware
        async def record(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            if not (request.method == "GET" and request.path in ("/health", "/v1/models")):
                self.seen.append((request.method, request.path_qs))
            return await handler(request)

        app = web.Application(middlewares=[record], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._other)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _other(self, _: web.Request) -> web.Response:
        return web.json_response({"error": "a route the gateway must never forward"}, status=599)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        try:  # vLLM gets standard JSON only: UTF-8, finite numbers, no lone surrogates
            body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except ValueError as err:
            return web.json_response({"error": f"the gateway forwarded non-standard JSON: {err}"}, status=500)
        if not body.get("stream"):
            return web.json_response({"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 3}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        text = json.dumps(body["messages"])
        try:
            for i, event in enumerate(EVENTS):
                await resp.write(b"data: " + event + b"\n\n")
                if i == 2 and "hold" in text:
                    await self.gate.wait()
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted += 1
            raise
        return resp


@dataclass
class Response:
    """One parsed HTTP response."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc

    @property
    def code(self) -> object:
        error = self.json().get("error")
        return error.get("code") if isinstance(error, dict) else None


async def read_response(reader: asyncio.StreamReader, timeout: float = 10.0) -> Response | None:
    """The next response on a connection, or None when the gateway closed it first."""

    async def read() -> Response | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            assert err.partial == b"", f"a partial response head: {err.partial[:200]!r}"
            return None
        except ConnectionResetError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        if status == 100:
            return Response(100, headers, b"")
        if "content-length" in headers:
            return Response(status, headers, await reader.readexactly(int(headers["content-length"])))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                body += await reader.readexactly(size + 2)
                if size == 0:
                    return Response(status, headers, body)
        return Response(status, headers, await reader.read())

    return await asyncio.wait_for(read(), timeout)


def chat_body(content: object = "hi", **extra: object) -> bytes:
    return json.dumps({"model": "fake", "messages": [{"role": "user", "content": content}], **extra}).encode()


@dataclass
class Door:
    """A running gateway and what a test needs to attack it and check it afterwards."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    key: str
    keys_file: Path
    audit: Path
    gateway: Gateway
    upstream: FakeVllm

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None, limit=1 << 20
        )

    def head(self, method: str = "POST", path: str = "/v1/chat/completions", *, length: int | None = None,
             extra: bytes = b"", key: str | None = None) -> bytes:  # fmt: skip
        """A request head with this door's key and a JSON content type."""
        out = f"{method} {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key or self.key}\r\n".encode()
        out += b"content-type: application/json\r\n" + extra
        if length is not None:
            out += b"content-length: %d\r\n" % length
        return out + b"\r\n"

    def post(self, body: bytes, *, extra: bytes = b"", key: str | None = None) -> bytes:
        return self.head(length=len(body), extra=extra, key=key) + body

    async def exchange(self, raw: bytes, timeout: float = 10.0) -> Response | None:
        """Send ``raw`` on a fresh connection and read one response (None: closed without one)."""
        reader, writer = await self.connect()
        try:
            writer.write(raw)
            await writer.drain()
            return await read_response(reader, timeout)
        finally:
            writer.close()

    def audit_lines(self) -> list[dict[str, object]]:
        if not self.audit.exists():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    async def settle(self, audit_lines: int | None = None, timeout: float = 5.0) -> None:
        """Wait until no request holds anything (and, given, the audit log has that many lines); fail otherwise."""
        adm = self.gateway.admission
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            idle = adm.inflight == 0 and adm.waiting == 0 and not adm.per_key and not self.gateway.relays
            idle = idle and all(u.inflight == 0 for u in self.gateway.pool.upstreams)
            if idle and (audit_lines is None or len(self.audit_lines()) == audit_lines):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(
            f"leaked: inflight={adm.inflight} waiting={adm.waiting} per_key={adm.per_key} "
            f"relays={len(self.gateway.relays)} upstream_inflight={[u.inflight for u in self.gateway.pool.upstreams]} "
            f"audit_lines={len(self.audit_lines())} (expected {audit_lines})"
        )

    async def healthy(self) -> None:
        """A normal streamed request is answered in full, and nothing is held afterwards."""
        lines = len(self.audit_lines())
        resp = await self.exchange(self.post(chat_body(stream=True)))
        assert resp is not None and resp.status == 200, resp
        assert resp.body.count(b"data: ") == len(EVENTS) + 1 and b"[DONE]" in resp.body
        await self.settle(lines + 1)
