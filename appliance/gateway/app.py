"""The gateway's ASGI application: five routes, everything else 404.

Why a plain ASGI callable and not FastAPI routes: on the hot path every layer costs. The reference measurements
(docs/workstation.md, "Why the gateway is plain ASGI") put a FastAPI + httpx StreamingResponse proxy at +3.8 ms TTFT
with 8 streams and 0.2x nginx's relay rate at 64; a bare ASGI relay with an aiohttp client was within a millisecond.
So the gateway is one class with a dict of routes, run by uvicorn with uvloop and httptools, talking to vLLM through
one long-lived aiohttp session created in the lifespan.

Routes: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models`` (both need a workstation key),
``GET /healthz``, ``GET /readyz``, ``GET /metrics``. No other vLLM route (``/invocations``, ``/tokenize``,
``/pause``, ...) is reachable through the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.gateway.admission import Admission
from appliance.gateway.audit import AuditLog
from appliance.gateway.config import GatewayConfig
from appliance.gateway.metrics import Metrics
from appliance.gateway.relay import RelayResult, UpstreamUnavailableError, relay_chat, relay_get
from appliance.gateway.upstreams import Pool, Upstream
from appliance.gateway.validate import Limits, RejectedError, validate_chat
from appliance.keys import KeyStore
from appliance.wire import error_body

__all__ = ["GatewayApp"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
KEY_HELP = (
    "Send the workstation key as 'Authorization: Bearer <key>' (with the openai SDK: api_key=...). "
    "The clinic's IT makes keys with 'clinic-edge keys add NAME'."
)


class _ClientGoneError(Exception):
    """The workstation disconnected while we were reading its request."""


@dataclass
class _Flight:
    """Per-request state shared with the disconnect watcher."""

    disconnected: bool = False


def _json(status: int, doc: dict[str, Any], rid: str, extra: list[tuple[bytes, bytes]] | None = None) -> list[Message]:
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", rid.encode()), *(extra or [])]  # fmt: skip
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def _error(status: int, code: str, message: str, rid: str, **kw: Any) -> list[Message]:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        type_ = "authentication_error"
    elif status == 429:
        type_ = "rate_limit_error"
    return _json(status, error_body(message, type_=type_, code=code, param=kw.pop("param", None)), rid, **kw)


class GatewayApp:
    """The ASGI application (``app(scope, receive, send)``); one instance per process."""

    def __init__(self, cfg: GatewayConfig) -> None:
        assert cfg.keys_file is not None
        self.cfg = cfg
        self.keys = KeyStore(cfg.keys_file)
        self.pool = Pool(
            cfg.upstreams,
            health_interval=cfg.health_interval_s,
            probe_interval=cfg.probe_interval_s,
            ready_window=cfg.ready_window_s,
            api_key=cfg.upstream_api_key,
        )
        self.admission = Admission(cfg.max_inflight, cfg.max_per_key, cfg.queue_timeout_s, cfg.max_queue)
        self.limits = Limits(cfg.max_images, cfg.max_image_bytes, cfg.max_image_pixels, cfg.max_tokens_cap)
        self.metrics = Metrics()
        self.metrics.gauges["inflight_requests"] = lambda: float(self.admission.inflight)
        self.metrics.gauges["waiting_requests"] = lambda: float(self.admission.waiting)
        self.metrics.labelled_gauges["upstream_healthy"] = lambda: {
            e["url"]: float(e["healthy"]) for e in self.pool.readiness()["upstreams"]
        }
        self.metrics.labelled_gauges["upstream_inflight"] = lambda: {
            u.url: float(u.inflight) for u in self.pool.upstreams
        }
        self.audit: AuditLog | None = None
        self.session: aiohttp.ClientSession | None = None
        self._retry_after = [(b"retry-after", str(cfg.retry_after_s).encode())]
        self._upstream_headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cfg.upstream_api_key:
            self._upstream_headers["Authorization"] = f"Bearer {cfg.upstream_api_key}"
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout_s, sock_connect=cfg.connect_timeout_s,
            sock_read=cfg.first_byte_timeout_s,
        )  # fmt: skip

    # --- ASGI entry ---------------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as err:  # reported to uvicorn, which exits
                    await send({"type": "lifespan.startup.failed", "message": str(err)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Open the upstream session and the audit log, start the health loop."""
        connector = aiohttp.TCPConnector(
            limit=self.cfg.max_inflight + 32, limit_per_host=0, keepalive_timeout=60, ttl_dns_cache=300
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )
        self.audit = AuditLog(self.cfg.audit_log)
        self.pool.start(self.session)

    async def shutdown(self) -> None:
        """Stop the health loop, close the session and the audit log."""
        await self.pool.stop()
        if self.session is not None:
            await self.session.close()
        if self.audit is not None:
            self.audit.close()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        rid = os.urandom(8).hex()
        if path == CHAT_PATH and method == "POST":
            await self._chat(scope, receive, send, rid)
        elif path == MODELS_PATH and method == "GET":
            await self._models(scope, send, rid)
        elif path == "/healthz" and method in ("GET", "HEAD"):
            await self._send(send, _json(200, {"alive": True}, rid))
        elif path == "/readyz" and method in ("GET", "HEAD"):
            doc = self.pool.readiness()
            await self._send(send, _json(200 if doc["ready"] else 503, doc, rid))
        elif path == "/metrics" and method == "GET":
            body = self.metrics.render().encode()
            headers = [(b"content-type", b"text/plain; version=0.0.4"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            known = path in (CHAT_PATH, MODELS_PATH, "/healthz", "/readyz", "/metrics")
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            message = (
                f"{method} {path[:100]} is not served by the clinic gateway. It serves POST {CHAT_PATH}, "
                f"GET {MODELS_PATH}, GET /healthz, GET /readyz and GET /metrics only."
            )
            await self._send(send, _error(status, code, message, rid))
            self._finish({"route": "other", "status": status, "reason": code, "request_id": rid}, time.perf_counter())

    @staticmethod
    async def _send(send: Send, messages: list[Message]) -> None:
        for m in messages:
            await send(m)

    # --- pieces shared by the routes ----------------------------------------------------------------------------

    def _authenticate(self, scope: Scope) -> tuple[str | None, str, str]:
        """(key name, reason code, message); name is None when refused."""
        value = b""
        for name, v in scope["headers"]:
            if name == b"authorization":
                value = v
                break
        if not value:
            return None, "missing_api_key", f"Missing API key (no Authorization header). {KEY_HELP}"
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None, "invalid_authorization", f"The Authorization header is not 'Bearer <key>'. {KEY_HELP}"
        name = self.keys.authenticate(token.strip().decode("latin-1"))
        if name is None:
            return None, "invalid_api_key", f"The API key is not valid (unknown or revoked). {KEY_HELP}"
        return name, "", ""

    def _finish(self, rec: dict[str, Any], started: float) -> None:
        """Count the request and write its audit line."""
        now = time.perf_counter()
        status = rec.get("status", 0)
        self.metrics.requests[(rec["route"], status)] += 1
        if rec.get("reason"):
            self.metrics.rejections[rec["reason"]] += 1
        rec["duration_ms"] = round((now - started) * 1000, 3)
        if rec["route"] == "chat" and status == 200:
            self.metrics.duration.observe(now - started)
        if self.audit is not None:
            self.audit.write(rec)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.cfg.max_body_bytes
        for name, v in scope["headers"]:
            if name == b"content-length" and v.isdigit() and int(v) > limit:
                raise RejectedError(413, "body_too_large", self._too_large(int(v)))
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _ClientGoneError
            chunk: bytes = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RejectedError(413, "body_too_large", self._too_large(size))
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, size: int) -> str:
        return (
            f"The request body is {size / 1e6:.1f} MB or more; the limit is {self.cfg.max_body_bytes / 1e6:.1f} MB. "
            "Send fewer or smaller images (export radiographs as PNG or JPEG at their native resolution)."
        )

    # --- routes -------------------------------------------------------------------------------------------------

    async def _models(self, scope: Scope, send: Send, rid: str) -> None:
        started = time.perf_counter()
        rec: dict[str, Any] = {"time": time.time(), "request_id": rid, "route": "models"}
        key, code, message = self._authenticate(scope)
        rec["key"] = key
        if key is None:
            rec.update(status=401, reason=code)
            await self._send(send, _error(401, code, message, rid, extra=[(b"www-authenticate", b"Bearer")]))
            return self._finish(rec, started)
        assert self.session is not None
        tried: tuple[Upstream, ...] = ()
        while (up := self.pool.pick(tried)) is not None:
            try:
                rec["status"] = await relay_get(
                    self.session, up.url + MODELS_PATH, headers=self._upstream_headers,
                    response_headers=[(b"x-request-id", rid.encode())], send=send, timeout=self._timeout,
                )  # fmt: skip
                rec["upstream"] = up.url
                return self._finish(rec, started)
            except UpstreamUnavailableError as err:
                self.pool.eject(up, f"connection failed: {err}"[:200])
                tried += (up,)
        rec.update(status=503, reason="no_upstream")
        await self._send(send, self._no_upstream(rid))
        self._finish(rec, started)

    def _no_upstream(self, rid: str) -> list[Message]:
        return _error(
            503,
            "no_upstream",
            "The AI model server is not available right now (starting, restarting or stopped). Retry after the "
            "number of seconds in Retry-After; if it persists, check the appliance dashboard.",
            rid,
            extra=self._retry_after,
        )

    async def _chat(self, scope: Scope, receive: Receive, send: Send, rid: str) -> None:
        started = time.perf_counter()
        rec: dict[str, Any] = {"time": time.time(), "request_id": rid, "route": "chat"}
        key, code, message = self._authenticate(scope)
        rec["key"] = key
        if key is None:
            rec.update(status=401, reason=code)
            await self._send(send, _error(401, code, message, rid, extra=[(b"www-authenticate", b"Bearer")]))
            return self._finish(rec, started)
        refused = await self.admission.acquire(key)
        if refused is not None:
            rec.update(status=429, reason=refused)
            what = {
                "per_key_limit": f"this workstation key already has {self.cfg.max_per_key} requests running",
                "gateway_busy": f"the gateway already has {self.cfg.max_inflight} requests running",
                "queue_full": "too many requests are already waiting",
            }[refused]
            await self._send(
                send,
                _error(
                    429, refused, f"Too many requests: {what}. Retry after the seconds in Retry-After.", rid,
                    extra=self._retry_after,
                ),
            )  # fmt: skip
            return self._finish(rec, started)
        try:
            await self._chat_admitted(scope, receive, send, rid=rid, rec=rec, started=started)
        finally:
            self.admission.release(key)
            self._finish(rec, started)

    async def _chat_admitted(
        self, scope: Scope, receive: Receive, send: Send, *, rid: str, rec: dict[str, Any], started: float
    ) -> None:
        try:
            body = await self._read_body(scope, receive)
            valid = validate_chat(body, self.limits)
        except RejectedError as rej:
            rec.update(status=rej.status, reason=rej.code)
            await self._send(send, _error(rej.status, rej.code, rej.message, rid, param=rej.param))
            return
        except _ClientGoneError:
            rec.update(status=499, reason="client_disconnected")
            return
        del body
        rec.update(stream=valid.stream, images=valid.images, image_bytes=valid.image_bytes)
        if valid.images:
            self.metrics.images += valid.images
            self.metrics.image_bytes += valid.image_bytes
        task = asyncio.current_task()
        assert task is not None and self.session is not None
        flight = _Flight()
        watcher = asyncio.create_task(self._watch_disconnect(receive, task, flight))
        result = RelayResult()
        headers = {**self._upstream_headers, "X-Request-Id": rid}
        response_headers = [(b"x-request-id", rid.encode()), (b"cache-control", b"no-cache")]
        tried: tuple[Upstream, ...] = ()
        up: Upstream | None = None
        try:
            while True:
                up = self.pool.pick(tried)
                if up is None:
                    rec.update(status=503, reason="no_upstream")
                    await self._send(send, self._no_upstream(rid))
                    return
                up.inflight += 1
                try:
                    await relay_chat(
                        self.session, up.url + CHAT_PATH, valid.body, headers=headers,
                        response_headers=response_headers, send=send, result=result, timeout=self._timeout,
                    )  # fmt: skip
                    break
                except UpstreamUnavailableError as err:
                    self.pool.eject(up, f"connection failed: {err}"[:200])
                    tried += (up,)
                finally:
                    up.inflight -= 1
            rec["status"] = result.status
            if result.failure:
                rec["reason"] = "upstream_stream_failed"
                self.pool.eject(up, result.failure)
            elif result.complete:
                self.pool.generation_ok(up)
            elif result.status >= 400:
                rec["reason"] = "upstream_rejected"
        except asyncio.CancelledError:
            if not flight.disconnected:
                raise
            task.uncancel()
            rec.update(status=499, reason="client_disconnected")
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            timed_out = isinstance(err, TimeoutError)
            status, code = (504, "upstream_timeout") if timed_out else (502, "upstream_error")
            rec.update(status=status, reason=code)
            if not result.headers_sent:
                what = "did not answer in time" if timed_out else "failed while answering"
                await self._send(
                    send,
                    _error(status, code, f"The AI model server {what}; retry the request.", rid,
                           extra=self._retry_after),
                )  # fmt: skip
        finally:
            watcher.cancel()
            rec["upstream"] = up.url if up else None
            rec["prompt_tokens"] = result.prompt_tokens
            rec["completion_tokens"] = result.completion_tokens
            if result.ttfb is not None:
                ttfb = result.ttfb - started
                rec["ttfb_ms"] = round(ttfb * 1000, 3)
                self.metrics.ttfb.observe(ttfb)

    @staticmethod
    async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], flight: _Flight) -> None:
        """Cancel the request's task when the workstation goes away (uvicorn's send() ignores a gone client)."""
        with contextlib.suppress(Exception):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    if not task.done():
                        flight.disconnected = True
                        task.cancel()
                    return
