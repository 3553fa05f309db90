"""The gateway's request handling: five routes, everything else 404.

Routes: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models`` (both need a workstation key),
``GET /healthz``, ``GET /readyz``, ``GET /metrics``. No other vLLM route (``/invocations``, ``/tokenize``,
``/pause``, ...) is reachable through the gateway.

A chat request goes: key → admission → validation (see :mod:`validate`) → least-busy admitted replica → relay (see
:mod:`relay`) → audit line, from callback to callback; the streamed bytes never pass through a task.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from appliance.gateway.admission import Admission
from appliance.gateway.audit import AuditLog
from appliance.gateway.config import GatewayConfig
from appliance.gateway.http11 import ClientConnection, Completion, Pending, Request
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
from appliance.gateway.validate import Limits, RejectedError, ValidRequest, validate_chat
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


@dataclass(eq=False, slots=True)
class _Chat:
    """One chat request on its way through the callbacks."""

    conn: ClientConnection
    req: Request
    rid: str
    rec: dict[str, Any]
    started: float
    key: str
    valid: ValidRequest | None = None
    result: RelayResult = field(default_factory=RelayResult)
    tried: tuple[Upstream, ...] = ()
    attempts: int = 0
    up: Upstream | None = None
    finished: Completion | None = None  # set done when the request is over (audit line written)
    waiting: asyncio.Task[None] | None = None  # connecting to vLLM

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"x-request-id", self.rid.encode()), (b"cache-control", b"no-cache")]

    def cancel_wait(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()


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
        self.conns = ConnectionPool(cfg.connect_timeout_s, cfg.upstream_keepalive_s)
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
        # Request ids: 16 random hex digits from a generator seeded once from os.urandom (no system call per request;
        # not a counter, which would tell anyone on the LAN how busy the clinic is).
        self._rid_random = random.Random(os.urandom(16))  # noqa: S311 - ids correlate log lines; they guard nothing
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
        """End requests vLLM left without a first byte for ``first_byte_timeout_s``, and streams it left silent
        mid-answer (a hung engine) for ``stall_timeout_s``; checking a few times per timeout."""
        limit = self.cfg.stall_timeout_s
        interval = min(max(min(limit, self.cfg.first_byte_timeout_s) / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            self._check_stalls(time.monotonic(), limit)

    def _check_stalls(self, now: float, limit: float) -> None:
        # A function of its own: a loop variable in the watchdog's frame would keep the last relay alive.
        for relay in list(self.relays):
            relay.check_timeouts(now, limit)

    # --- dispatch -----------------------------------------------------------------------------------------------

    def handle(self, conn: ClientConnection, req: Request) -> Pending | None:
        """Answer one request (the connection's handler): None when answered, else a future that resolves then."""
        rid = f"{self._rid_random.getrandbits(64):016x}"
        path, method = req.path, req.method
        if path == CHAT_PATH and method == "POST":
            return self._chat(conn, req, rid)
        if path == MODELS_PATH and method == "GET":
            return asyncio.get_running_loop().create_task(self._models(conn, req, rid))
        if path == "/healthz" and method in ("GET", "HEAD"):
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
        return None

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

    def _keyed(
        self, conn: ClientConnection, req: Request, rid: str, route: str
    ) -> tuple[str | None, dict[str, Any], float]:
        """Check the workstation key: (key name, audit record, start). A refused key is answered 401 and audited."""
        started = time.perf_counter()
        key, code, message = self._authenticate(req)
        rec: dict[str, Any] = {"time": time.time(), "request_id": rid, "route": route, "key": key}
        if key is None:
            self._json(conn, req, 401, _error_doc(401, code, message), rid, (b"www-authenticate", b"Bearer"))
            rec.update(status=401, reason=code)
            self._finish(rec, started)
        return key, rec, started

    async def _models(self, conn: ClientConnection, req: Request, rid: str) -> None:
        key, rec, started = self._keyed(conn, req, rid, "models")
        if key is None:
            return
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

    # A chat request runs from callback to callback: the key check, admission, validation and the send to vLLM happen
    # inside the read of the request (like nginx), and the audit line inside the relay's completion. A task is made
    # only to wait: for an admission slot, or for a new connection to vLLM. Under load a task's first step waits
    # behind a whole batch of other streams' reads; measured at 64 streams, that hop alone cost 1.2 ms p50, 4.8 ms p90.

    def _chat(self, conn: ClientConnection, req: Request, rid: str) -> Pending | None:
        key, rec, started = self._keyed(conn, req, rid, "chat")
        if key is None:
            return None
        chat = _Chat(conn, req, rid, rec, started, key)
        if self.admission.try_acquire(key):
            return self._chat_admitted(chat)
        return asyncio.get_running_loop().create_task(self._chat_queued(chat))

    async def _chat_queued(self, chat: _Chat) -> None:
        try:
            refused = await self.admission.acquire(chat.key)
        except asyncio.CancelledError:
            chat.rec.update(status=499, reason="client_disconnected")
            self._finish(chat.rec, chat.started)
            return
        if refused is not None:
            what = {
                "per_key_limit": f"this workstation key already has {self.cfg.max_per_key} requests running",
                "gateway_busy": f"the gateway already has {self.cfg.max_inflight} requests running",
                "queue_full": "too many requests are already waiting",
            }[refused]
            msg = f"Too many requests: {what}. Retry after the number of seconds in Retry-After."
            self._json(chat.conn, chat.req, 429, _error_doc(429, refused, msg), chat.rid, self._retry_after)
            chat.rec.update(status=429, reason=refused)
            self._finish(chat.rec, chat.started)
            return
        finished = self._chat_admitted(chat)
        if finished is not None:
            over = asyncio.get_running_loop().create_future()
            finished.add_done_callback(lambda _: None if over.done() else over.set_result(None))
            try:
                await over
            except asyncio.CancelledError:
                finished.cancel()  # the workstation left while the request waited for a connection
                raise

    def _chat_admitted(self, chat: _Chat) -> Completion | None:
        """Validate and send; the returned future resolves when the answer is over (None: it already is)."""
        req = chat.req
        try:
            if req.too_large:
                raise RejectedError(
                    413,
                    "body_too_large",
                    f"The request body is {req.too_large / 1e6:.1f} MB; the limit is "
                    f"{self.cfg.max_body_bytes / 1e6:.1f} MB. Send fewer or smaller images.",
                )
            chat.valid = validate_chat(req.body, self.limits)
        except RejectedError as rej:
            self._json(chat.conn, req, rej.status, _error_doc(rej.status, rej.code, rej.message, rej.param), chat.rid)
            chat.rec.update(status=rej.status, reason=rej.code)
            self._chat_over(chat)
            return None
        valid = chat.valid
        chat.rec.update(stream=valid.stream, images=valid.images, image_bytes=valid.image_bytes)
        if valid.images:
            self.metrics.images += valid.images
            self.metrics.image_bytes += valid.image_bytes
        chat.finished = Completion(on_cancel=chat.cancel_wait)  # the workstation left while we waited to connect
        self._chat_attempt(chat)
        return None if chat.finished.done() else chat.finished

    def _chat_attempt(self, chat: _Chat) -> None:
        """Pick a replica and send to it over a kept-alive connection, or start connecting to it."""
        if chat.conn.closed:  # the workstation left before a retry
            self._chat_gone(chat)
            return
        up = self.pool.pick(chat.tried) if chat.attempts < _MAX_ATTEMPTS else None
        chat.attempts += 1
        if up is None:
            chat.up = None
            self._no_upstream(chat.conn, chat.req, chat.rid)
            chat.rec.update(status=503, reason="no_upstream")
            self._chat_over(chat)
            return
        chat.up = up
        up.inflight += 1
        upconn = self.conns.take_idle(up.url)
        if upconn is not None:
            self._chat_send(chat, up, upconn, reused=True)
        else:
            chat.waiting = asyncio.get_running_loop().create_task(self._chat_connect(chat, up))

    async def _chat_connect(self, chat: _Chat, up: Upstream) -> None:
        try:
            upconn = await self.conns.connect(up.url)
        except UpstreamUnavailableError as err:
            chat.waiting = None  # before the next attempt, which may start a task of its own
            up.inflight -= 1
            self.pool.eject(up, f"{err}"[:200])
            chat.tried += (up,)
            self._chat_attempt(chat)
            return
        except asyncio.CancelledError:
            chat.waiting = None
            up.inflight -= 1
            self._chat_gone(chat)
            return
        chat.waiting = None
        if chat.conn.closed:
            up.inflight -= 1
            self.conns.release(upconn)
            self._chat_gone(chat)
            return
        self._chat_send(chat, up, upconn, reused=False)

    def _chat_send(self, chat: _Chat, up: Upstream, upconn: UpstreamConnection, *, reused: bool) -> None:
        assert chat.valid is not None
        relay = Relay(
            chat.conn, upconn, chat.result, extra_headers=chat.extra_headers(), keep_alive=chat.req.keep_alive,
            first_byte_timeout=self.cfg.first_byte_timeout_s,
            on_done=lambda err: self._chat_relayed(chat, up, upconn, relay, reused=reused, err=err),
        )  # fmt: skip
        head = self._upstream_head[up.url] + b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n" % (
            chat.rid.encode(), chat.valid.body_bytes,
        )  # fmt: skip
        chat.conn.relay = relay
        self.relays.add(relay)
        upconn.send(head, chat.valid.body, relay)

    def _chat_relayed(
        self,
        chat: _Chat,
        up: Upstream,
        upconn: UpstreamConnection,
        relay: Relay,
        *,
        reused: bool,
        err: Exception | None,
    ) -> None:
        chat.conn.relay = None
        self.relays.discard(relay)
        up.inflight -= 1
        self.conns.release(upconn)
        if isinstance(err, UpstreamUnavailableError):
            if not reused:
                self.pool.eject(up, f"{err}"[:200])
                chat.tried += (up,)
            # else a kept-alive connection closed under us: try again (a fresh one next time)
            self._chat_attempt(chat)
            return
        rec, result = chat.rec, chat.result
        if isinstance(err, UpstreamTimeoutError):
            message = "The AI model server did not answer in time; retry the request."
            self._json(chat.conn, chat.req, 504, _error_doc(504, "upstream_timeout", message), chat.rid,
                       self._retry_after)  # fmt: skip
            rec.update(status=504, reason="upstream_timeout")
        else:
            rec["status"] = 499 if result.client_gone else result.status
            if result.client_gone:
                rec["reason"] = "client_disconnected"
            elif result.failure:
                rec["reason"] = "upstream_stream_failed"
                self.pool.eject(up, result.failure)
            elif result.complete:
                self.pool.generation_ok(up)
            elif result.status >= 400:
                rec["reason"] = "upstream_rejected"
        self._chat_over(chat)

    def _chat_gone(self, chat: _Chat) -> None:
        """The workstation left before its request reached vLLM."""
        chat.rec.update(status=499, reason="client_disconnected")
        self._chat_over(chat)

    def _chat_over(self, chat: _Chat) -> None:
        """The end of an admitted request, however it ended: the slot back, the audit line, the waiter woken."""
        rec, result = chat.rec, chat.result
        rec["upstream"] = chat.up.url if chat.up else None
        rec["prompt_tokens"] = result.prompt_tokens
        rec["completion_tokens"] = result.completion_tokens
        if result.ttfb is not None:
            ttfb = result.ttfb - chat.started
            rec["ttfb_ms"] = round(ttfb * 1000, 3)
            self.metrics.ttfb.observe(ttfb)
        self.admission.release(chat.key)
        self._finish(rec, chat.started)
        if chat.finished is not None:
            chat.finished.set_done()
