"""The gateway's HTTP/1.1 server side: an asyncio protocol with httptools' C parser, no framework.

The handler runs inside the read that completed the request, and upstream bytes go from the upstream protocol's
callback straight to this connection's transport, like nginx; a task exists only while a request waits. Why this
rather than an ASGI app, and what to test when changing it: docs/gateway.md.

One request at a time per connection (pipelined requests queue behind it); keep-alive; TLS comes from the event loop
(``create_server(ssl=...)``).

Limits, all enforced while the request arrives (docs/workstation.md lists them for workstation developers): the
request line (:data:`MAX_REQUEST_LINE`, 414), the head's size and field count (:data:`MAX_HEAD_BYTES`,
:data:`MAX_HEADER_FIELDS`, 431), the head's arrival time (:data:`HEAD_TIMEOUT`), the body's size (``max_body``, 413:
from Content-Length before any body byte is read, else as soon as a chunked body passes it). The handler's ``head``
check (route, key, Content-Type) runs when the head is complete, before the body is buffered and before
``100 Continue`` is sent. A refused request is still handed to the handler, with :attr:`Request.refusal` set and
no body, so that it is answered, counted and audited like any other; then the connection discards what the client
still sends and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

import httptools

__all__ = [
    "ClientConnection",
    "Completion",
    "FlowTarget",
    "Pending",
    "Refusal",
    "Request",
    "close_expired",
    "response_head",
    "watch_deadlines",
]

_BIG_BODY = 256 * 1024
IDLE_TIMEOUT = 30.0  # a kept-alive connection with no new request is closed after this
HEAD_TIMEOUT = 20.0  # the request line and headers must arrive within this (slow-loris on headers)
REQUEST_TIMEOUT = 120.0  # then the body must arrive within this (slow-loris on the body)
# After a refusal, what the client still sends is read and dropped until it pauses this long (or LINGER_MAX passed),
# then the connection is closed (nginx's lingering_timeout and lingering_time: 5 s and 30 s).
LINGER_TIMEOUT = 2.0
LINGER_MAX = 30.0
# nginx answers a request line over large_client_header_buffers (4 x 8k) with 414; h11 (uvicorn) bounds the whole
# head at 16 KiB (max_incomplete_event_size). Both are far above what a workstation sends (under 1 KiB).
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_FIELDS = 100  # Apache's LimitRequestFields; nginx and h11 bound bytes only (a workstation sends ~8)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def response_head(status: int, headers: list[tuple[bytes, bytes]], *, close: bool = False) -> bytes:
    """Status line and headers, ready to write."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    parts += [b"%s: %s\r\n" % (k, v) for k, v in headers]
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is answered with an error without being handled: status, code and a message saying what to do."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(slots=True)
class Request:
    """One parsed request. With ``refusal`` set the body was not read and the answer is that refusal."""

    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes | bytearray
    keep_alive: bool
    http10: bool = False  # an HTTP/1.0 client: no chunked framing, close after the answer
    refusal: Refusal | None = None
    key: str | None = None  # the workstation key's name, set by the handler's head check
    checked: bool = False  # the handler's head check ran


class _StopParsingError(Exception):
    """Raised from a parser callback to stop parsing a refused request."""


class FlowTarget(Protocol):
    """What a relay exposes to the client connection: back-pressure, disconnect, and a failure in either."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def client_gone(self) -> None: ...
    def crash(self, exc: Exception) -> None: ...


class Pending(Protocol):
    """A request not answered yet: an asyncio task waiting for something, or a :class:`Completion`."""

    def done(self) -> bool: ...
    def cancel(self) -> bool: ...
    def add_done_callback(self, fn: Callable[[Any], object], /) -> None: ...


class Completion:
    """The end of a request, signalled synchronously.

    An asyncio future runs its callbacks on the next turn of the loop; under load that turn comes after a batch of
    other streams' reads, and the workstation's next request on this connection would wait for it.
    """

    __slots__ = ("_callbacks", "_done", "on_cancel")

    def __init__(self, on_cancel: Callable[[], None] | None = None) -> None:
        self._done = False
        self._callbacks: list[Callable[[Any], object]] = []
        self.on_cancel = on_cancel  # the workstation left while the request waited (relays have client_gone)

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        if self.on_cancel is not None and not self._done:
            self.on_cancel()
        return True

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def set_done(self) -> None:
        """Mark the request answered and run the callbacks, now."""
        if self._done:
            return
        self._done = True
        self.on_cancel = None  # it usually points back at whoever holds this completion
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


# Called inside the read that completed the request; returns None when it answered already, else what resolves
# when the answer is over (a relay in flight, or a task waiting for something).
Handler = Callable[["ClientConnection", Request], "Pending | None"]
# Called when a request's head is complete, before its body is read: may set ``refusal`` (and ``key``).
HeadCheck = Callable[[Request], None]


class ClientConnection(asyncio.Protocol):
    """One workstation connection."""

    def __init__(
        self, handler: Handler, max_body: int, tracker: set[ClientConnection], head: HeadCheck | None = None
    ) -> None:
        self.handler = handler
        self.head = head
        self.max_body = max_body
        self.tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.relay: FlowTarget | None = None  # set while upstream bytes flow to this client
        self.task: Pending | None = None  # the request being answered, when it is not over yet
        self._pending: deque[Request] = deque()
        # httptools calls on_url for every piece; pointing it at a C method keeps that call out of the interpreter.
        # on_header (one call per header, counted against the limits) is a method; names are lower-cased once, when
        # the headers are complete.
        self._url: list[bytes] = []
        self.on_url = self._url.append
        self._raw_headers: dict[bytes, bytes] = {}
        self._fields = 0
        self._head_bytes = 0
        self._in_head = False
        self._discard = False  # a refusal is under way: what the client still sends is dropped
        self._linger_until = 0.0  # when dropping stops at the latest (set once the refusal is answered)
        self._req: Request | None = None  # the request whose head is complete
        self._headers: dict[bytes, bytes] = {}
        self._chunks: list[bytes] = []
        self._big: bytearray | None = None
        self._size = 0
        self._paused = False
        # When this connection is closed unless something happens: idle between requests, or too slow sending one.
        # watch_deadlines() checks every connection a few times a second (no timer per request).
        self.deadline = 0.0
        self.parser = httptools.HttpRequestParser(self)  # last: it looks up the on_* callbacks once, here

    # --- asyncio.Protocol -----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses
        self.tracker.add(self)
        self._arm(IDLE_TIMEOUT)

    def _arm(self, seconds: float | None) -> None:
        """(Re)set the connection's deadline: idle between requests, or reading one request; None: no deadline."""
        self.deadline = time.monotonic() + seconds if seconds else 0.0

    def data_received(self, data: bytes) -> None:
        if self._discard:  # after a refusal: dropped; while lingering, each read extends the wait (like nginx)
            if self._linger_until:
                self.deadline = min(time.monotonic() + LINGER_TIMEOUT, self._linger_until)
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            if not self._discard:  # not one of our own refusals: the framing itself is broken
                self._refuse(400, "malformed_request", _malformed_message(err))
            return
        if self._in_head:  # the head is not complete yet: bound what it may grow to (httptools buffers it)
            self._head_bytes += len(data)
            if sum(map(len, self._url)) > MAX_REQUEST_LINE:
                self._refuse(414, "request_line_too_long", _LINE_MESSAGE)
            elif self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, "headers_too_large", _HEAD_MESSAGE)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._arm(None)
        self.tracker.discard(self)
        self._gone()

    def eof_received(self) -> bool:
        # The workstation closed its side. With answer bytes still queued, the transport would wait for them to
        # drain before reporting the loss, and vLLM would go on generating for nobody: end the request now.
        self.closed = True
        self._gone()
        return False

    def _gone(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            try:
                relay.client_gone()
            except Exception as exc:  # the request's own failure path answers and audits it
                relay.crash(exc)
        elif self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self._paused = True
        if self.relay is not None:
            self.relay.pause()

    def resume_writing(self) -> None:
        self._paused = False
        if self.relay is not None:
            self.relay.resume()

    # --- httptools callbacks ----------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.task is None:
            self._arm(HEAD_TIMEOUT)
        self._url.clear()
        self._raw_headers.clear()
        self._fields = 0
        self._head_bytes = 0
        self._in_head = True
        self._chunks = []
        self._big = None
        self._size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._fields > MAX_HEADER_FIELDS or self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(431, "headers_too_large", _HEAD_MESSAGE)
            raise _StopParsingError
        self._raw_headers[name] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.task is None:
            self._arm(REQUEST_TIMEOUT)
        headers = self._headers = {name.lower(): value for name, value in self._raw_headers.items()}
        url = b"".join(self._url)
        parser = self.parser
        version = parser.get_http_version()
        path = url.split(b"?", 1)[0].decode("latin-1")
        req = self._req = Request(parser.get_method().decode("latin-1"), path, headers, b"", True, version == "1.0")
        if len(url) > MAX_REQUEST_LINE or version not in _VERSIONS or parser.should_upgrade():
            refusal: Refusal | None = _line_refusal(len(url), version)
        elif self.head is not None:
            self.head(req)
            refusal = req.refusal
        else:
            refusal = None
        length = headers.get(b"content-length")
        size = int(length) if length else 0  # httptools has checked that it is all digits
        if refusal is None and (size > self.max_body or b"expect" in headers):
            refusal = self._body_refusal(req, size)
        if refusal is not None:
            self._refuse(refusal.status, refusal.code, refusal.message, refusal.headers)
            raise _StopParsingError
        if size >= _BIG_BODY:
            # A big body (a radiograph) is copied into one buffer as it arrives, overlapping the upload,
            # instead of being joined (4 MB at once) when it is complete.
            self._big = bytearray(size)

    def _body_refusal(self, req: Request, size: int) -> Refusal | None:
        """Content-Length and Expect, checked before any body byte is read (and before 100 Continue)."""
        if size > self.max_body:
            return _too_large(size, self.max_body)
        expect = req.headers[b"expect"]
        if expect.lower() != b"100-continue":
            return Refusal(417, "expectation_failed", _EXPECT_MESSAGE)
        if not req.http10:  # HTTP/1.0 clients do not know 100 Continue
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this before a big body
        return None

    def on_body(self, body: bytes) -> None:
        start = self._size
        self._size += len(body)
        if self._big is not None and self._size <= len(self._big):
            self._big[start : self._size] = body
        elif self._size <= self.max_body:
            if self._big is not None:  # more than Content-Length: cannot happen with httptools; be safe
                self._chunks, self._big = [bytes(self._big[:start])], None
            self._chunks.append(body)
        else:  # a chunked body past the limit: refuse now rather than read on
            self._chunks, self._big = [], None
            refusal = _too_large(self._size, self.max_body)
            self._refuse(refusal.status, refusal.code, refusal.message)
            raise _StopParsingError

    def on_message_complete(self) -> None:
        body: bytes | bytearray
        if self._big is not None:
            body = self._big
        else:
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._big = None
        self._chunks = []
        req, self._req = self._req, None
        assert req is not None
        req.body = body
        # HTTP/1.0 has no chunked framing: a streamed answer ends when the connection closes.
        req.keep_alive = bool(self.parser.should_keep_alive()) and not req.http10
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        if self.task is None:
            self._arm(None)
            self._start(req)
        else:
            self._pending.append(req)

    def _refuse(self, status: int, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Stop reading this connection and have the handler answer ``status`` (after any request before it)."""
        self._discard = True
        self._in_head = False
        self._chunks, self._big = [], None
        req, self._req = self._req, None
        if req is None:  # refused before its head was complete
            path = b"".join(self._url).split(b"?", 1)[0][:MAX_REQUEST_LINE].decode("latin-1")
            method = self.parser.get_method().decode("latin-1") if self._url else ""  # known once the URL began
            req = Request(method=method, path=path, headers={}, body=b"", keep_alive=False)
        req.body, req.keep_alive, req.checked = b"", False, True
        req.refusal = Refusal(status, code, message, headers)
        self._enqueue(req)

    # --- handling -----------------------------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        try:
            pending = self.handler(self, req)
        except Exception:  # a bug outside any request's scope: answer 500 and close, keep serving the others
            traceback.print_exc(file=sys.stderr)
            self._fail(500, b"internal error in the clinic gateway")
            pending = None
        if pending is None or pending.done():
            self._after(req, pending)
        else:
            self.task = pending
            pending.add_done_callback(lambda done: self._after(req, done))

    def _after(self, req: Request, done: Pending | None) -> None:
        self.task = None
        self.relay = None
        if isinstance(done, asyncio.Future) and not done.cancelled() and done.exception() is not None:
            exc = done.exception()
            assert exc is not None
            traceback.print_exception(exc, file=sys.stderr)
            if not self.closed:
                self._fail(500, b"internal error in the clinic gateway")
        if self._discard and not self._pending and not self.closed:
            self._linger()
        elif not req.keep_alive and not self.closed:
            self.close()
        elif self._pending and not self.closed:
            self._start(self._pending.popleft())
        elif not self.closed:
            self._arm(IDLE_TIMEOUT)

    def write(self, data: bytes) -> None:
        """Write unless the client is gone."""
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, req: Request) -> None:
        """A complete response with a content-length (no body for HEAD)."""
        head = response_head(status, [*headers, (b"content-length", b"%d" % len(body))], close=not req.keep_alive)
        self.write(head if req.method == "HEAD" else head + body)

    def close(self) -> None:
        """Close the connection after what was written."""
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True  # nothing more is written or started on it

    def _linger(self) -> None:
        """After a refusal: say we are done, drop what the client still sends for a while, then close (closing at
        once with unread bytes makes the kernel reset the connection, and the client may lose our answer)."""
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            transport.write_eof()
        self._linger_until = time.monotonic() + LINGER_MAX
        self._arm(LINGER_TIMEOUT)

    def _fail(self, status: int, message: bytes) -> None:
        body = b'{"error":{"message":"%b","type":"server_error","code":"internal_error","param":null}}' % message
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        self.write(response_head(status, headers, close=True) + body)
        self.close()

    @property
    def paused(self) -> bool:
        """True while the client's socket buffer is full."""
        return self._paused


_VERSIONS = ("1.1", "1.0")


def _line_refusal(url_bytes: int, version: str) -> Refusal:
    if url_bytes > MAX_REQUEST_LINE:
        return Refusal(414, "request_line_too_long", _LINE_MESSAGE)
    if version not in _VERSIONS:
        return Refusal(400, "http_version_not_supported", _VERSION_MESSAGE)  # 505 would count as our fault
    return Refusal(400, "upgrade_not_supported", _VERSION_MESSAGE)


def _too_large(size: int, limit: int) -> Refusal:
    return Refusal(
        413,
        "body_too_large",
        f"The request body is {size / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB. Send fewer or smaller images.",
    )


def _malformed_message(err: Exception) -> str:
    # httptools' messages name the framing rule broken ("Duplicate Content-Length"); they never quote the request.
    return (
        f"The request is not valid HTTP/1.1 ({str(err)[:80]}). Send one Content-Length or 'Transfer-Encoding: "
        "chunked' (not both), CRLF line ends, no folded headers; an OpenAI SDK does this."
    )


_LINE_MESSAGE = f"The request line is longer than {MAX_REQUEST_LINE} bytes. Send POST /v1/chat/completions."
_HEAD_MESSAGE = (
    f"The request headers are larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADER_FIELDS} fields. "
    "Send only the headers an OpenAI SDK sends."
)
_VERSION_MESSAGE = "The gateway speaks HTTP/1.1 (and 1.0) only, without upgrades. Use an OpenAI SDK over https://."
_EXPECT_MESSAGE = "The only Expect the gateway understands is '100-continue'; remove the header."


def close_expired(connections: set[ClientConnection], now: float) -> None:
    """Close the connections whose deadline has passed."""
    for conn in [c for c in connections if 0.0 < c.deadline < now]:
        conn.deadline = 0.0
        conn.close()


async def watch_deadlines(connections: set[ClientConnection]) -> None:
    """Close idle and too-slow connections, checking a few times per timeout (runs until cancelled)."""
    while True:
        await asyncio.sleep(min(IDLE_TIMEOUT, HEAD_TIMEOUT, REQUEST_TIMEOUT, LINGER_TIMEOUT, 4.0) / 4)
        close_expired(connections, time.monotonic())


def cancel_all(connections: set[ClientConnection]) -> None:
    """Close every connection (shutdown)."""
    for conn in list(connections):
        with contextlib.suppress(Exception):
            conn.close()
