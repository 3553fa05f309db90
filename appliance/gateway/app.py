"""The gateway's request handling: five routes, everything else 404.

Routes: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models`` (both need a workstation key),
``GET /healthz``, ``GET /readyz``, ``GET /metrics``. No other vLLM route (``/invocations``, ``/tokenize``,
``/pause``, ...) is reachable through the gateway.

A chat request goes: key → admission → validation (see :mod:`validate`) → least-busy admitted replica → relay (see
:mod:`relay`) → audit line. The request's task does the first steps and waits for the relay's end; the streamed
bytes themselves never pass through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import aiohttp

from appliance.gateway.admission import Admission
from appliance.gateway.audit import AuditLog
from appliance.gateway.config import GatewayConfig
from appliance.gateway.http11 import ClientConnection, Request
from appliance.gateway.metrics import Metrics
from appliance.gateway.relay import (
    ConnectionPool,
    Relay,
    RelayResult,
    UpstreamConnection,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from appliance.gateway.upstreams import Pool, Upstream
from appliance.gateway.validate import Limits, RejectedError, validate_chat
from appliance.wire import error_body

__all__ = ["CHAT_PATH", "MODELS_PATH", "Gateway"]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
KEY_HELP = (
    "Send the workstation key as 'Authorization: Bearer <key>' (with the openai SDK: api_key=...). "
    "The clinic's IT makes keys with 'clinic-edge keys add NAME'."
)
_JSON = (b"content-type", b"application/json")
_MAX_ATTEMPTS = 4  # connection attempts per request, over all replicas


def _error_doc(status: int, code: str, message: str, param: str | None = None) -> bytes:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        type_ = "authentication_error"
    elif status == 429:
        type_ = "rate_limit_error"
    return json.dumps(error_body(message, type_=type_, code=code, param=param), separators=(",", ":")).encode()


class Gateway:
    """Everything one gateway process holds: keys, replicas, admission, metrics, audit log, upstream connections."""

    def __init__(self, cfg: GatewayConfig) -> None:
        from appliance.keys import KeyStore

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
        self.conns = ConnectionPool(cfg.connect_timeout_s)
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
        self.relays: set[Relay] = set()  # streams in flight, for the stall watchdog
        self._watchdog: asyncio.Task[None] | None = None
        self._retry_after = (b"retry-after", str(cfg.retry_after_s).encode())
        auth = f"authorization: Bearer {cfg.upstream_api_key}\r\n" if cfg.upstream_api_key else ""
        self._upstream_head = {}
        for up in self.pool.upstreams:
            netloc = up.url.split("://", 1)[1]
            self._upstream_head[up.url] = (
                f"POST {CHAT_PATH} HTTP/1.1\r\nhost: {netloc}\r\ncontent-type: application/json\r\n"
                f"accept-encoding: identity\r\n{auth}"
            ).encode()

    async def startup(self) -> None:
        """Open the audit log and the health-check session, start the health loop."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32), auto_decompress=False, skip_auto_headers=("User-Agent",)
        )
        self.audit = AuditLog(self.cfg.audit_log)
        self.pool.start(self.session)
        self._watchdog = asyncio.create_task(self._watch_stalls(), name="clinic-edge-stall-watchdog")

    async def shutdown(self) -> None:
        """Stop the health loop, close sessions, connections and the audit log."""
        await self.pool.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.conns.close_all()
        if self.session is not None:
            await self.session.close()
        if self.audit is not None:
            self.audit.close()

    async def _watch_stalls(self) -> None:
        """End streams whose vLLM went silent mid-answer (a hung engine), checking a few times per stall timeout."""
        limit = self.cfg.stall_timeout_s
        while True:
            await asyncio.sleep(min(max(limit / 4, 0.05), 5.0))
            now = time.monotonic()
            for relay in list(self.relays):
                relay.check_stall(now, limit)

    # --- dispatch -----------------------------------------------------------------------------------------------

    async def handle(self, conn: ClientConnection, req: Request) -> None:
        """Answer one request (the connection's handler)."""
        rid = os.urandom(8).hex()
        path, method = req.path, req.method
        if path == CHAT_PATH and method == "POST":
            await self._chat(conn, req, rid)
        elif path == MODELS_PATH and method == "GET":
            await self._models(conn, req, rid)
        elif path == "/healthz" and method in ("GET", "HEAD"):
            self._json(conn, req, 200, b'{"alive":true}', rid)
        elif path == "/readyz" and method in ("GET", "HEAD"):
            doc = self.pool.readiness()
            self._json(conn, req, 200 if doc["ready"] else 503, json.dumps(doc).encode(), rid)
        elif path == "/metrics" and method == "GET":
            conn.respond(200, [(b"content-type", b"text/plain; version=0.0.4")], self.metrics.render().encode(), req)
        else:
            known = path in (CHAT_PATH, MODELS_PATH, "/healthz", "/readyz", "/metrics")
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            message = (
                f"{method} {path[:100]} is not served by the clinic gateway. It serves POST {CHAT_PATH}, "
                f"GET {MODELS_PATH}, GET /healthz, GET /readyz and GET /metrics only."
            )
            self._json(conn, req, status, _error_doc(status, code, message), rid)
            rec = {"time": time.time(), "request_id": rid, "route": "other", "status": status, "reason": code}
            self._finish(rec, time.perf_counter())

    @staticmethod
    def _json(
        conn: ClientConnection, req: Request, status: int, body: bytes, rid: str, *extra: tuple[bytes, bytes]
    ) -> None:
        conn.respond(status, [_JSON, (b"x-request-id", rid.encode()), *extra], body, req)

    def _authenticate(self, req: Request) -> tuple[str | None, str, str]:
        """(key name, reason code, message); name is None when refused."""
        value = req.headers.get(b"authorization", b"")
        if not value:
            return None, "missing_api_key", f"Missing API key (no Authorization header). {KEY_HELP}"
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return None, "invalid_authorization", f"The Authorization header is not 'Bearer <key>'. {KEY_HELP}"
        name = self.keys.authenticate(token.strip().decode("latin-1"))
        if name is None:
            return None, "invalid_api_key", f"The API key is not valid (unknown or revoked). {KEY_HELP}"
        return name, "", ""

    def _refuse_key(self, conn: ClientConnection, req: Request, rid: str, code: str, message: str) -> None:
        self._json(conn, req, 401, _error_doc(401, code, message), rid, (b"www-authenticate", b"Bearer"))

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

    def _no_upstream(self, conn: ClientConnection, req: Request, rid: str) -> None:
        message = (
            "The AI model server is not available right now (starting, restarting or stopped). Retry after the "
            "number of seconds in Retry-After; if it persists, check the appliance dashboard."
        )
        self._json(conn, req, 503, _error_doc(503, "no_upstream", message), rid, self._retry_after)

    # --- routes -------------------------------------------------------------------------------------------------

    async def _models(self, conn: ClientConnection, req: Request, rid: str) -> None:
        started = time.perf_counter()
        key, code, message = self._authenticate(req)
        rec: dict[str, Any] = {"time": time.time(), "request_id": rid, "route": "models", "key": key}
        if key is None:
            self._refuse_key(conn, req, rid, code, message)
            rec.update(status=401, reason=code)
            return self._finish(rec, started)
        assert self.session is not None
        tried: tuple[Upstream, ...] = ()
        headers = {"Authorization": f"Bearer {self.cfg.upstream_api_key}"} if self.cfg.upstream_api_key else {}
        try:
            while (up := self.pool.pick(tried)) is not None:
                try:
                    timeout = aiohttp.ClientTimeout(total=10)
                    async with self.session.get(up.url + MODELS_PATH, headers=headers, timeout=timeout) as resp:
                        body = await resp.read()
                        self._json(conn, req, resp.status, body, rid)
                        rec.update(status=resp.status, upstream=up.url)
                        return
                except (aiohttp.ClientError, TimeoutError, OSError) as err:
                    self.pool.eject(up, f"connection failed: {type(err).__name__}")
                    tried += (up,)
            self._no_upstream(conn, req, rid)
            rec.update(status=503, reason="no_upstream")
        except asyncio.CancelledError:
            rec.update(status=499, reason="client_disconnected")
        finally:
            self._finish(rec, started)

    async def _chat(self, conn: ClientConnection, req: Request, rid: str) -> None:
        started = time.perf_counter()
        key, code, message = self._authenticate(req)
        rec: dict[str, Any] = {"time": time.time(), "request_id": rid, "route": "chat", "key": key}
        if key is None:
            self._refuse_key(conn, req, rid, code, message)
            rec.update(status=401, reason=code)
            return self._finish(rec, started)
        try:
            refused = await self.admission.acquire(key)
        except asyncio.CancelledError:
            rec.update(status=499, reason="client_disconnected")
            return self._finish(rec, started)
        if refused is not None:
            what = {
                "per_key_limit": f"this workstation key already has {self.cfg.max_per_key} requests running",
                "gateway_busy": f"the gateway already has {self.cfg.max_inflight} requests running",
                "queue_full": "too many requests are already waiting",
            }[refused]
            msg = f"Too many requests: {what}. Retry after the number of seconds in Retry-After."
            self._json(conn, req, 429, _error_doc(429, refused, msg), rid, self._retry_after)
            rec.update(status=429, reason=refused)
            return self._finish(rec, started)
        try:
            await self._chat_admitted(conn, req, rid, rec, started)
        except asyncio.CancelledError:
            rec.update(status=499, reason="client_disconnected")
        finally:
            self.admission.release(key)
            self._finish(rec, started)

    async def _chat_admitted(
        self, conn: ClientConnection, req: Request, rid: str, rec: dict[str, Any], started: float
    ) -> None:
        try:
            if req.too_large:
                raise RejectedError(
                    413,
                    "body_too_large",
                    f"The request body is {req.too_large / 1e6:.1f} MB; the limit is "
                    f"{self.cfg.max_body_bytes / 1e6:.1f} MB. Send fewer or smaller images.",
                )
            valid = validate_chat(req.body, self.limits)
        except RejectedError as rej:
            self._json(conn, req, rej.status, _error_doc(rej.status, rej.code, rej.message, rej.param), rid)
            rec.update(status=rej.status, reason=rej.code)
            return
        rec.update(stream=valid.stream, images=valid.images, image_bytes=valid.image_bytes)
        if valid.images:
            self.metrics.images += valid.images
            self.metrics.image_bytes += valid.image_bytes
        result = RelayResult()
        extra = [(b"x-request-id", rid.encode()), (b"cache-control", b"no-cache")]
        tried: tuple[Upstream, ...] = ()
        up: Upstream | None = None
        try:
            for _ in range(_MAX_ATTEMPTS):
                up = self.pool.pick(tried)
                if up is None:
                    break
                up.inflight += 1
                upconn: UpstreamConnection | None = None
                relay: Relay | None = None
                try:
                    upconn, reused = await self.conns.acquire(up.url)
                    relay = Relay(
                        conn, upconn, result, extra_headers=extra, keep_alive=req.keep_alive,
                        first_byte_timeout=self.cfg.first_byte_timeout_s,
                    )  # fmt: skip
                    head = self._upstream_head[up.url] + b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n" % (
                        rid.encode(), valid.body_bytes,
                    )  # fmt: skip
                    conn.relay = relay
                    self.relays.add(relay)
                    upconn.send(head, valid.body, relay)
                    await relay.done
                    break
                except UpstreamUnavailableError as err:
                    if upconn is None or not reused:
                        self.pool.eject(up, f"{err}"[:200])
                        tried += (up,)
                    # a reused keep-alive connection closed under us: try again (a fresh one next time)
                finally:
                    conn.relay = None
                    if relay is not None:
                        self.relays.discard(relay)
                    up.inflight -= 1
                    if upconn is not None:
                        self.conns.release(upconn)
            else:
                up = None
            if result.status == 0 and not result.client_gone:
                self._no_upstream(conn, req, rid)
                rec.update(status=503, reason="no_upstream")
                return
            rec["status"] = 499 if result.client_gone else result.status
            if result.client_gone:
                rec["reason"] = "client_disconnected"
            elif result.failure:
                rec["reason"] = "upstream_stream_failed"
                if up is not None:
                    self.pool.eject(up, result.failure)
            elif result.complete and up is not None:
                self.pool.generation_ok(up)
            elif result.status >= 400:
                rec["reason"] = "upstream_rejected"
        except UpstreamTimeoutError:
            message = "The AI model server did not answer in time; retry the request."
            self._json(conn, req, 504, _error_doc(504, "upstream_timeout", message), rid, self._retry_after)
            rec.update(status=504, reason="upstream_timeout")
        finally:
            rec["upstream"] = up.url if up else None
            rec["prompt_tokens"] = result.prompt_tokens
            rec["completion_tokens"] = result.completion_tokens
            if result.ttfb is not None:
                ttfb = result.ttfb - started
                rec["ttfb_ms"] = round(ttfb * 1000, 3)
                self.metrics.ttfb.observe(ttfb)
