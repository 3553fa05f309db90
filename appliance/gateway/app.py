"""The gateway's request handling: five routes, everything else 404.

Routes: ``POST /v1/chat/completions`` (streamed or not), ``GET /v1/models`` (both need a workstation key),
``GET /healthz``, ``GET /readyz``, ``GET /metrics``. No other vLLM route (``/invocations``, ``/tokenize``,
``/pause``, ...) is reachable through the gateway.

A chat request goes: route, key and Content-Type (when its head is complete, before the body is read) → admission →
validation (see :mod:`validate`) → DICOM images converted to PNG in worker processes (see :mod:`workers`), if any →
least-busy admitted replica → relay (see :mod:`relay`) → audit line, from callback to callback; the streamed bytes
never pass through a task.

One rule for every request, whatever fails inside: each request has a :class:`_Scope` that records what it holds (an
admission slot, a conversion in a worker, a count on a replica, a connection to vLLM, a relay), and
:meth:`Gateway._end` is the one place that gives all of it back, counts the request and writes its one audit line.
Every way into a request's code from the event loop (the read that completed it, the tasks that wait for it, vLLM's
callbacks, the stall watchdog) goes through a guard that hands any exception to :meth:`Gateway._fail`: a
:class:`RejectedError` is the client's 4xx, anything else our 500 (logged with the request id and the stack, never the
request's content), and then ``_end``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from appliance.gateway.admission import Admission
from appliance.gateway.audit import AuditLog
from appliance.gateway.config import GatewayConfig
from appliance.gateway.dicom import DicomError
from appliance.gateway.http11 import ClientConnection, Completion, Pending, Refusal, Request
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
from appliance.gateway.workers import ConversionPool, default_workers
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
_PROBES = ("/healthz", "/readyz", "/metrics")  # answered at once, not audited (scraped every few seconds)
_METHODS = {CHAT_PATH: ("POST",), MODELS_PATH: ("GET",), "/healthz": ("GET", "HEAD"), "/readyz": ("GET", "HEAD"),
            "/metrics": ("GET",)}  # fmt: skip
_ROUTE_NAMES = {CHAT_PATH: "chat", MODELS_PATH: "models"}
_INTERNAL_ERROR = (
    "The gateway failed on this request (a bug, logged on the box with this request id). Retry; if it repeats, "
    "report the x-request-id to the clinic's IT."
)
_MEDIA_TYPE_MESSAGE = (
    "The request's Content-Type is not application/json; vLLM accepts only that (HTTP 400). Send the body as JSON "
    "with 'Content-Type: application/json' (an OpenAI SDK does)."
)


def _error_doc(status: int, code: str, message: str, param: str | None = None) -> bytes:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        type_ = "authentication_error"
    elif status == 429:
        type_ = "rate_limit_error"
    return json.dumps(error_body(message, type_=type_, code=code, param=param), separators=(",", ":")).encode()


@dataclass(eq=False, slots=True)
class _Scope:
    """One request from its head to its audit line: what it holds, each released once by :meth:`Gateway._end`."""

    conn: ClientConnection
    req: Request
    rid: str
    route: str  # "chat", "models" or "other" (the audit log's route)
    started: float
    rec: dict[str, Any]
    key: str = ""
    slot: bool = False  # holds an admission slot for ``key``
    up: Upstream | None = None
    up_held: bool = False  # counted in ``up.inflight``
    upconn: UpstreamConnection | None = None
    relay: Relay | None = None
    valid: ValidRequest | None = None
    result: RelayResult = field(default_factory=RelayResult)
    tried: tuple[Upstream, ...] = ()
    attempts: int = 0
    finished: Completion | None = None  # set done when the request is over (audit line written)
    waiting: asyncio.Task[None] | None = None  # converting DICOM images, or connecting to vLLM
    ended: bool = False

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
        self.converter = ConversionPool(default_workers())
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
        self.converter.close()
        if self.session is not None:
            await self.session.close()
        if self.audit is not None:
            self.audit.close()

    async def _watch_stalls(self) -> None:
        """End requests vLLM left without a first byte for ``first_byte_timeout_s``, and streams it left silent
        mid-answer (a hung engine) for ``stall_timeout_s``; checking a few times per timeout. Also close upstream
        connections idle for longer than ``upstream_keepalive_s``."""
        limit = self.cfg.stall_timeout_s
        interval = min(max(min(limit, self.cfg.first_byte_timeout_s) / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._check_stalls(now, limit)
            self.conns.close_expired(now)

    def _check_stalls(self, now: float, limit: float) -> None:
        # A function of its own: a loop variable in the watchdog's frame would keep the last relay alive.
        for relay in list(self.relays):
            try:
                relay.check_timeouts(now, limit)
            except Exception as exc:
                relay.crash(exc)

    # --- dispatch: the one way in, and the one way out ----------------------------------------------------------

    def check_head(self, req: Request) -> None:
        """The checks that need only the head (the connection's head check): route, key, Content-Type. Sets
        ``req.refusal`` (the body is then never read) or ``req.key``."""
        req.checked = True
        try:
            req.refusal = self._head_refusal(req)
        except Exception as exc:  # a bug: answered as a 500 by handle(), like any other
            _log_crash("(head check)", exc)
            req.refusal = Refusal(500, "internal_error", _INTERNAL_ERROR)

    def _head_refusal(self, req: Request) -> Refusal | None:
        path, method = req.path, req.method
        allowed = _METHODS.get(path)
        if allowed is None or method not in allowed:
            status, code = (405, "method_not_allowed") if allowed else (404, "not_found")
            message = (
                f"{method} {path[:100]} is not served by the clinic gateway. It serves POST {CHAT_PATH}, "
                f"GET {MODELS_PATH}, GET /healthz, GET /readyz and GET /metrics only."
            )
            return Refusal(status, code, message)
        if path in _PROBES:
            return None
        key, code, message = self._authenticate(req)
        if key is None:
            return Refusal(401, code, message, ((b"www-authenticate", b"Bearer"),))
        req.key = key
        if path == CHAT_PATH:
            ctype = req.headers.get(b"content-type", b"")
            # vLLM's validate_json_request: the media type before any ';' must be application/json, else 400.
            if ctype.split(b";", 1)[0].strip().lower() != b"application/json":
                return Refusal(400, "unsupported_media_type", _MEDIA_TYPE_MESSAGE)
        return None

    def handle(self, conn: ClientConnection, req: Request) -> Pending | None:
        """Answer one request (the connection's handler): None when answered, else what resolves when it is."""
        if not req.checked:
            self.check_head(req)
        path = req.path
        if req.refusal is None and path in _PROBES:
            self._probe(conn, req, path)
            return None
        rid = f"{self._rid_random.getrandbits(64):016x}"
        route = _ROUTE_NAMES.get(path, "other")
        rec: dict[str, Any] = {"time": time.time(), "request_id": rid, "route": route, "key": req.key}
        s = _Scope(conn, req, rid, route, time.perf_counter(), rec, req.key or "")
        try:
            if req.refusal is not None:
                r = req.refusal
                self._answer_error(s, r.status, r.code, r.message, None, *r.headers)
                return None
            if route == "chat":
                return self._chat(s)
            return self._spawn(s, self._models(s))
        except Exception as exc:
            self._fail(s, exc)
            return None

    def _spawn(self, s: _Scope, step: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a waiting step of request ``s`` as a task, under the same rule as the rest of it."""
        return asyncio.get_running_loop().create_task(self._guarded(s, step))

    async def _guarded(self, s: _Scope, step: Coroutine[Any, Any, None]) -> None:
        try:
            await step
        except asyncio.CancelledError:  # the workstation left while the request waited
            if not s.ended:
                s.rec.update(status=499, reason="client_disconnected")
                self._end(s)
            raise
        except Exception as exc:
            self._fail(s, exc)

    def _fail(self, s: _Scope, exc: Exception) -> None:
        """Whatever raised on request ``s``'s path: the client's 4xx (a RejectedError) or our 500, then its end."""
        if isinstance(exc, RejectedError):
            status, code, message, param = exc.status, exc.code, exc.message, exc.param
        else:
            _log_crash(s.rid, exc)
            status, code, message, param = 500, "internal_error", _INTERNAL_ERROR, None
        if s.ended:
            return
        relay, upconn = s.relay, s.upconn
        if relay is not None:
            relay.finished, relay.on_done = True, _ignore_done
        if upconn is not None:
            upconn.sink = None
            upconn.close()  # its state is unknown: vLLM sees the disconnect and aborts
        if s.result.headers_sent:  # the 200 is out: all we can do is end the answer early
            s.rec.update(status=500 if status == 500 else s.rec.get("status") or 200, reason=code)
            s.conn.close()
            self._end(s)
            return
        if status >= 500:
            s.req.keep_alive = False  # the connection's state is unknown after a bug: close it after the answer
        self._answer_error(s, status, code, message, param)
        if status >= 500:
            s.conn.close()

    def _answer_error(
        self, s: _Scope, status: int, code: str, message: str, param: str | None, *extra: tuple[bytes, bytes]
    ) -> None:
        """Answer ``s`` with an OpenAI-style error and end it."""
        self._json(s.conn, s.req, status, _error_doc(status, code, message, param), s.rid, *extra)
        s.rec.update(status=status, reason=code)
        self._end(s)

    def _end(self, s: _Scope) -> None:
        """The end of every request, however it ended: everything it holds given back, counted, audited once, and the
        connection told (its next request may start)."""
        if s.ended:
            return
        s.ended = True
        if s.slot:
            s.slot = False
            self.admission.release(s.key)
        waiting, s.waiting = s.waiting, None
        if waiting is not None and waiting is not asyncio.current_task():
            waiting.cancel()
        self._release_upstream(s)
        rec = s.rec
        if s.route == "chat":
            result = s.result
            rec["upstream"] = s.up.url if s.up else None
            rec["prompt_tokens"] = result.prompt_tokens
            rec["completion_tokens"] = result.completion_tokens
            if result.ttfb is not None:
                ttfb = result.ttfb - s.started
                rec["ttfb_ms"] = round(ttfb * 1000, 3)
                self.metrics.ttfb.observe(ttfb)
        rec.setdefault("status", 500)
        self._finish(rec, s.started)
        if s.finished is not None:
            s.finished.set_done()

    def _release_upstream(self, s: _Scope) -> None:
        """Give back the replica count, the relay and the connection to vLLM (kept alive only after a whole answer)."""
        if s.up_held:
            s.up_held = False
            assert s.up is not None
            s.up.inflight -= 1
        relay, s.relay = s.relay, None
        if relay is not None:
            self.relays.discard(relay)
            if s.conn.relay is relay:
                s.conn.relay = None
        upconn, s.upconn = s.upconn, None
        if upconn is not None:
            self.conns.release(upconn)

    @staticmethod
    def _json(
        conn: ClientConnection, req: Request, status: int, body: bytes, rid: str, *extra: tuple[bytes, bytes]
    ) -> None:
        conn.respond(status, [_JSON, (b"x-request-id", rid.encode()), *extra], body, req)

    def _probe(self, conn: ClientConnection, req: Request, path: str) -> None:
        rid = f"{self._rid_random.getrandbits(64):016x}"
        if path == "/healthz":
            self._json(conn, req, 200, b'{"alive":true}', rid)
        elif path == "/readyz":
            doc = self.pool.readiness()
            self._json(conn, req, 200 if doc["ready"] else 503, json.dumps(doc).encode(), rid)
        else:
            conn.respond(200, [(b"content-type", b"text/plain; version=0.0.4")], self.metrics.render().encode(), req)

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

    def _no_upstream(self, s: _Scope) -> None:
        message = (
            "The AI model server is not available right now (starting, restarting or stopped). Retry after the "
            "number of seconds in Retry-After; if it persists, check the appliance dashboard."
        )
        s.up = None
        self._answer_error(s, 503, "no_upstream", message, None, self._retry_after)

    # --- routes -------------------------------------------------------------------------------------------------

    async def _models(self, s: _Scope) -> None:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {self.cfg.upstream_api_key}"} if self.cfg.upstream_api_key else {}
        while (up := self.pool.pick(s.tried)) is not None:
            try:
                timeout = aiohttp.ClientTimeout(total=10)
                async with self.session.get(up.url + MODELS_PATH, headers=headers, timeout=timeout) as resp:
                    body = await resp.read()
                    self._json(s.conn, s.req, resp.status, body, s.rid)
                    s.rec.update(status=resp.status, upstream=up.url)
                    self._end(s)
                    return
            except (aiohttp.ClientError, TimeoutError, OSError) as err:
                self.pool.eject(up, f"connection failed: {type(err).__name__}")
                s.tried += (up,)
        self._no_upstream(s)

    # A chat request runs from callback to callback: admission, validation and the send to vLLM happen inside the
    # read of the request (like nginx), and the audit line inside the relay's completion. A task is made only to
    # wait: for an admission slot, or for a new connection to vLLM. Under load a task's first step waits behind a
    # whole batch of other streams' reads; measured at 64 streams, that hop alone cost 1.2 ms p50, 4.8 ms p90.

    def _chat(self, s: _Scope) -> Pending | None:
        if self.admission.try_acquire(s.key):
            s.slot = True
            return self._chat_admitted(s)
        return self._spawn(s, self._chat_queued(s))

    async def _chat_queued(self, s: _Scope) -> None:
        refused = await self.admission.acquire(s.key)
        if refused is not None:
            what = {
                "per_key_limit": f"this workstation key already has {self.cfg.max_per_key} requests running",
                "gateway_busy": f"the gateway already has {self.cfg.max_inflight} requests running",
                "queue_full": "too many requests are already waiting",
            }[refused]
            msg = f"Too many requests: {what}. Retry after the number of seconds in Retry-After."
            self._answer_error(s, 429, refused, msg, None, self._retry_after)
            return
        s.slot = True
        finished = self._chat_admitted(s)
        if finished is not None:
            over = asyncio.get_running_loop().create_future()
            finished.add_done_callback(lambda _: None if over.done() else over.set_result(None))
            try:
                await over
            except asyncio.CancelledError:
                finished.cancel()  # the workstation left while the request waited for a connection
                raise

    def _chat_admitted(self, s: _Scope) -> Completion | None:
        """Validate and send; the returned completion is done when the answer is over (None: it already is)."""
        valid = s.valid = validate_chat(s.req.body, self.limits)  # RejectedError: the guard answers it
        s.rec.update(stream=valid.stream, images=valid.images, image_bytes=valid.image_bytes)
        if valid.images:
            self.metrics.images += valid.images
            self.metrics.image_bytes += valid.image_bytes
        s.finished = Completion(on_cancel=s.cancel_wait)  # the workstation left while we converted or connected
        if valid.dicoms:
            s.waiting = self._spawn(s, self._chat_convert(s, valid))
        else:
            self._chat_attempt(s)
        return None if s.finished.done() else s.finished

    async def _chat_convert(self, s: _Scope, valid: ValidRequest) -> None:
        """Convert the request's DICOM images to PNG (in worker processes), fill their slots, then send."""
        jobs = [self.converter.convert(d.base64(), self.limits.max_image_pixels) for d in valid.dicoms]
        outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        s.waiting = None
        for part, outcome in zip(valid.dicoms, outcomes, strict=True):
            if isinstance(outcome, DicomError):
                raise RejectedError(400, outcome.code, f"{part.where} (DICOM) was refused: {outcome.message}.")
            if isinstance(outcome, BaseException):
                raise outcome
        images = [o for o in outcomes if not isinstance(o, BaseException)]
        for part, image in zip(valid.dicoms, images, strict=True):
            valid.body[part.slot] = image.png_base64
        valid.body_bytes = sum(map(len, valid.body))
        s.rec["dicom"] = [image.describe() for image in images]
        self.metrics.dicom_images += len(images)
        for image in images:
            self.metrics.dicom_conversion.observe(image.ms / 1000)
        self._chat_attempt(s)

    def _chat_attempt(self, s: _Scope) -> None:
        """Pick a replica and send to it over a kept-alive connection, or start connecting to it."""
        if s.conn.closed:  # the workstation left before a retry
            s.rec.update(status=499, reason="client_disconnected")
            self._end(s)
            return
        up = self.pool.pick(s.tried) if s.attempts < _MAX_ATTEMPTS else None
        s.attempts += 1
        if up is None:
            self._no_upstream(s)
            return
        s.up, s.up_held = up, True
        up.inflight += 1
        upconn = self.conns.take_idle(up.url)
        if upconn is not None:
            self._chat_send(s, up, upconn, reused=True)
        else:
            s.waiting = self._spawn(s, self._chat_connect(s, up))

    async def _chat_connect(self, s: _Scope, up: Upstream) -> None:
        try:
            upconn = await self.conns.connect(up.url)
        except UpstreamUnavailableError as err:
            s.waiting = None  # before the next attempt, which may start a task of its own
            self._release_upstream(s)
            self.pool.eject(up, f"{err}"[:200])
            s.tried += (up,)
            self._chat_attempt(s)
            return
        s.waiting = None
        if s.ended or s.conn.closed:
            self.conns.release(upconn)  # a fresh connection that carried nothing: closed
            if not s.ended:
                s.rec.update(status=499, reason="client_disconnected")
                self._end(s)
            return
        self._chat_send(s, up, upconn, reused=False)

    def _chat_send(self, s: _Scope, up: Upstream, upconn: UpstreamConnection, *, reused: bool) -> None:
        assert s.valid is not None
        s.upconn = upconn
        relay = Relay(
            s.conn, upconn, s.result, extra_headers=s.extra_headers(), keep_alive=s.req.keep_alive,
            first_byte_timeout=self.cfg.first_byte_timeout_s, framed=not s.req.http10,
            on_done=lambda err: self._chat_relayed(s, up, reused=reused, err=err),
            on_crash=functools.partial(self._fail, s),
        )  # fmt: skip
        head = self._upstream_head[up.url] + b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n" % (
            s.rid.encode(), s.valid.body_bytes,
        )  # fmt: skip
        s.relay = s.conn.relay = relay
        self.relays.add(relay)
        upconn.send(head, s.valid.body, relay)

    def _chat_relayed(self, s: _Scope, up: Upstream, *, reused: bool, err: Exception | None) -> None:
        if isinstance(err, UpstreamUnavailableError):
            self._release_upstream(s)
            if not reused:
                self.pool.eject(up, f"{err}"[:200])
                s.tried += (up,)
            # else a kept-alive connection closed under us: try again (a fresh one next time)
            self._chat_attempt(s)
            return
        rec, result = s.rec, s.result
        if isinstance(err, UpstreamTimeoutError):
            message = "The AI model server did not answer in time; retry the request."
            self._answer_error(s, 504, "upstream_timeout", message, None, self._retry_after)
            return
        if err is not None:
            self._fail(s, err)
            return
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
        self._end(s)


def _ignore_done(_: Exception | None) -> None:
    pass


def _log_crash(rid: str, exc: Exception) -> None:
    """A bug on a request's path, on standard error: the request id, the exception's type and where it was raised.
    Not its message: a message can quote what it failed on, which may be patient text."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    sys.stderr.write(f"clinic-edge gateway: internal error on request {rid}: {type(exc).__name__}\n{frames}")
    sys.stderr.flush()
