"""The gateway's HTTP/1.1 server side: an asyncio protocol with httptools' C parser, no framework.

Why not uvicorn + ASGI: with ASGI every streamed chunk wakes the request's task and goes through ``await send()``;
at 64 streams that per-chunk task switch was the gateway's whole cost (benchmark: +18 ms TTFT p50, 0.72x nginx's relay
rate). Here the handler runs inside the read that completed the request, and upstream bytes go from the upstream
protocol's callback straight to this connection's transport, like nginx; a task exists only while a request waits.

One request at a time per connection (pipelined requests queue behind it); keep-alive; request bodies bounded while
they arrive; TLS comes from the event loop (``create_server(ssl=...)``).
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
    "Request",
    "close_expired",
    "response_head",
    "watch_deadlines",
]

_BIG_BODY = 256 * 1024
IDLE_TIMEOUT = 30.0  # a kept-alive connection with no new request is closed after this
REQUEST_TIMEOUT = 120.0  # headers and body of one request must arrive within this (slow-loris guard)
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def response_head(status: int, headers: list[tuple[bytes, bytes]], *, close: bool = False) -> bytes:
    """Status line and headers, ready to write."""
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    parts += [b"%s: %s\r\n" % (k, v) for k, v in headers]
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


@dataclass(slots=True)
class Request:
    """One parsed request; ``body`` is empty and ``too_large`` the size seen when it exceeded the limit."""

    method: str
    path: str
    headers: dict[bytes, bytes]
    body: bytes | bytearray
    keep_alive: bool
    too_large: int = 0


class FlowTarget(Protocol):
    """What a relay exposes to the client connection: back-pressure and disconnect."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def client_gone(self) -> None: ...


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


class ClientConnection(asyncio.Protocol):
    """One workstation connection."""

    def __init__(self, handler: Handler, max_body: int, tracker: set[ClientConnection]) -> None:
        self.handler = handler
        self.max_body = max_body
        self.tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.relay: FlowTarget | None = None  # set while upstream bytes flow to this client
        self.task: Pending | None = None  # the request being answered, when it is not over yet
        self._pending: deque[Request] = deque()
        # httptools calls on_url and on_header for every piece; pointing them at C methods keeps those calls out of
        # the interpreter (names are lower-cased once, when the headers are complete).
        self._url: list[bytes] = []
        self.on_url = self._url.append
        self._raw_headers: dict[bytes, bytes] = {}
        self.on_header = self._raw_headers.__setitem__
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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, b"upgrades are not supported")
        except httptools.HttpParserError:
            self._fail(400, b"malformed HTTP request")

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
            relay.client_gone()
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
            self._arm(REQUEST_TIMEOUT)
        self._url.clear()
        self._raw_headers.clear()
        self._chunks = []
        self._big = None
        self._size = 0

    def on_headers_complete(self) -> None:
        self._headers = {name.lower(): value for name, value in self._raw_headers.items()}
        if self._headers.get(b"expect", b"").lower() == b"100-continue":
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this before a big body
        length = self._headers.get(b"content-length", b"")
        if length.isdigit() and _BIG_BODY <= int(length) <= self.max_body:
            # A big body (a radiograph) is copied into one buffer as it arrives, overlapping the upload,
            # instead of being joined (4 MB at once) when it is complete.
            self._big = bytearray(int(length))

    def on_body(self, body: bytes) -> None:
        start = self._size
        self._size += len(body)
        if self._big is not None and self._size <= len(self._big):
            self._big[start : self._size] = body
        elif self._size <= self.max_body:
            if self._big is not None:  # more than Content-Length: cannot happen with httptools; be safe
                self._chunks, self._big = [bytes(self._big[:start])], None
            self._chunks.append(body)
        elif self._chunks:
            self._chunks = []

    def on_message_complete(self) -> None:
        too_large = self._size if self._size > self.max_body else 0
        body: bytes | bytearray
        if too_large:
            body = b""
        elif self._big is not None:
            body = self._big
        else:
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._big = None
        path = b"".join(self._url).split(b"?", 1)[0].decode("latin-1")
        req = Request(
            method=self.parser.get_method().decode("latin-1"),
            path=path,
            headers=self._headers,
            body=body,
            keep_alive=bool(self.parser.should_keep_alive()),
            too_large=too_large,
        )
        self._chunks = []
        if self.task is None:
            self._arm(None)
            self._start(req)
        else:
            self._pending.append(req)

    # --- handling -----------------------------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        try:
            pending = self.handler(self, req)
        except Exception:  # a bug: answer 500 and close, keep serving the others
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
        if not req.keep_alive and not self.closed:
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

    def _fail(self, status: int, message: bytes) -> None:
        self.write(response_head(status, [(b"content-length", b"%d" % len(message))], close=True) + message)
        self.close()

    @property
    def paused(self) -> bool:
        """True while the client's socket buffer is full."""
        return self._paused


def close_expired(connections: set[ClientConnection], now: float) -> None:
    """Close the connections whose deadline has passed."""
    for conn in [c for c in connections if 0.0 < c.deadline < now]:
        conn.deadline = 0.0
        conn.close()


async def watch_deadlines(connections: set[ClientConnection]) -> None:
    """Close idle and too-slow connections, checking a few times per timeout (runs until cancelled)."""
    while True:
        await asyncio.sleep(min(IDLE_TIMEOUT, REQUEST_TIMEOUT, 4.0) / 4)
        close_expired(connections, time.monotonic())


def cancel_all(connections: set[ClientConnection]) -> None:
    """Close every connection (shutdown)."""
    for conn in list(connections):
        with contextlib.suppress(Exception):
            conn.close()
