"""Relaying one request to a vLLM upstream and its answer back, bytes untouched, from callback to callback.

:class:`UpstreamConnection` is an asyncio protocol with httptools' C response parser; :class:`Relay` receives its
callbacks and writes to the workstation's connection directly: each piece of the upstream body becomes one HTTP
chunk to the workstation the moment it arrives (no buffering, no event re-serialisation, no task switch). The
gateway only peeks at the bytes for the audit log's token counts (a substring test) and for ``[DONE]`` at the end.
Back-pressure: when the workstation's socket is full, reading from the upstream pauses.

Failures:

* connection refused before anything was sent → :class:`UpstreamUnavailableError` (the caller tries another
  replica, then answers 503);
* the upstream stops in the middle of a stream → an SSE error event and ``[DONE]`` (the 200 is already sent);
  when it stops after ``[DONE]`` (only the closing empty chunk is lost), the answer was complete and just ends;
* the upstream goes silent in the middle of a stream (a hung engine) → the same, once :meth:`Relay.check_timeouts`
  has seen no byte for ``stall_timeout`` (the gateway's watchdog calls it every few seconds; nothing per chunk);
* the workstation disconnects → the upstream connection is closed, which makes vLLM abort the generation;
* no answer within ``first_byte_timeout`` → the upstream connection is closed and the caller answers 504 (the same
  watchdog sees it: no timer per request);
* an exception in any of these callbacks (a bug) → the upstream connection is closed and ``on_crash`` gets it: the
  request's owner answers, audits and releases it as it does every request.

An HTTP/1.0 workstation (``framed=False``) gets the stream unframed, ended by closing the connection.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

from appliance.gateway.http11 import ClientConnection, response_head
from appliance.wire import DONE_EVENT, sse_error_event

__all__ = [
    "ConnectionPool",
    "Relay",
    "RelayResult",
    "UpstreamConnection",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
]

_PROMPT_RE = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_RE = re.compile(rb'"completion_tokens":\s*(\d+)')
_DONE = DONE_EVENT.rstrip()
_STREAM_FAILED = sse_error_event(
    "The model server stopped in the middle of this answer; the answer is incomplete. Retry the request; if it "
    "keeps happening, check the appliance dashboard.",
    code="upstream_stream_failed",
)


def _ignore(_: Exception | None) -> None:
    pass


def _reraise(exc: Exception) -> None:
    raise exc


class UpstreamUnavailableError(Exception):
    """The upstream could not be reached, or dropped the connection before answering."""


class UpstreamTimeoutError(Exception):
    """The upstream sent nothing within the first-byte timeout."""


@dataclass(slots=True)
class RelayResult:
    """What happened, for the audit log and the pool."""

    status: int = 0
    ttfb: float | None = None  # perf_counter when the first body byte went to the workstation
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    complete: bool = False  # a full answer was relayed (the upstream can generate)
    failure: str | None = None  # why a started stream ended badly
    headers_sent: bool = False
    client_gone: bool = False


def _tokens(result: RelayResult, data: bytes) -> None:
    m = _PROMPT_RE.search(data)
    if m:
        result.prompt_tokens = int(m.group(1))
    m = _COMPLETION_RE.search(data)
    if m:
        result.completion_tokens = int(m.group(1))


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a vLLM server."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        # httptools calls on_body for every HTTP chunk; pointing it at a list's append keeps that call in C.
        self.bodies: list[bytes] = []
        self.on_body = self.bodies.append
        self.parser = httptools.HttpResponseParser(self)
        self.sink: Relay | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self.got_response = False
        self._ctype = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio subclasses

    def send(self, head: bytes, body: list[bytes | memoryview], sink: Relay) -> None:
        """Write one request; the answer goes to ``sink``."""
        assert self.transport is not None
        self.sink = sink
        self.bodies.clear()
        self.reusable = False
        self.got_response = False
        self._ctype = b""
        self.transport.writelines([head, *body])

    def data_received(self, data: bytes) -> None:
        sink = self.sink  # the parser's callbacks clear it when the answer completes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:  # one of our callbacks raised: a bug on the request path
            self._crash(sink, err.__context__ if isinstance(err.__context__, Exception) else err)
            return
        except httptools.HttpParserError:
            self.close()  # vLLM sent something that is not HTTP; connection_lost ends the answer
        try:
            if self.sink is not None:
                self.sink.flush()  # one write to the workstation per read from vLLM, however many events it held
        except Exception as exc:
            self._crash(sink, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink, self.sink = self.sink, None
        if sink is not None:
            try:
                sink.on_lost(self.got_response)
            except Exception as err:
                sink.crash(err)

    def _crash(self, sink: Relay | None, exc: Exception) -> None:
        self.sink = None
        self.close()  # its state is unknown: never reuse it
        if sink is not None:
            sink.crash(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._ctype = value

    def on_headers_complete(self) -> None:
        self.got_response = True
        if self.sink is not None:
            self.sink.on_headers(self.parser.get_status_code(), self._ctype)

    def on_message_complete(self) -> None:
        self.reusable = bool(self.parser.should_keep_alive())
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_complete()

    def close(self) -> None:
        """Drop the connection (vLLM sees the disconnect and aborts what it was doing for us)."""
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()


class ConnectionPool:
    """Idle keep-alive connections per upstream, reused for up to ``keepalive`` seconds (the newest first)."""

    def __init__(self, connect_timeout: float, keepalive: float) -> None:
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._idle: dict[str, list[UpstreamConnection]] = {}

    def take_idle(self, url: str) -> UpstreamConnection | None:
        """A kept-alive connection to ``url`` that is still open, or None."""
        idle = self._idle.get(url)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            conn.close()
        return None

    async def connect(self, url: str) -> UpstreamConnection:
        """A new connection. Raises :class:`UpstreamUnavailableError` when it cannot connect."""
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(url),
                    parts.hostname or "127.0.0.1",
                    parts.port or (443 if parts.scheme == "https" else 80),
                    ssl=parts.scheme == "https" or None,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as err:
            raise UpstreamUnavailableError(f"cannot connect: {type(err).__name__}: {err}"[:200]) from err
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        """Keep a connection whose answer completed; close any other."""
        if conn.reusable and not conn.closed and conn.sink is None:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            conn.close()

    def close_expired(self, now: float) -> None:
        """Close the idle connections kept longer than ``keepalive`` (the watchdog calls this every few seconds):
        after a burst, their sockets would otherwise stay open until vLLM's own keep-alive timeout."""
        for url, idle in self._idle.items():
            keep = [c for c in idle if not c.closed and now - c.idle_since < self.keepalive]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            self._idle[url] = keep

    def close_all(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


class Relay:
    """Receives one upstream answer and writes it to the workstation; calls ``on_done`` once when it is over.

    ``on_done(None)`` after an answer (complete, cut short or refused: see :class:`RelayResult`), else with
    :class:`UpstreamUnavailableError` or :class:`UpstreamTimeoutError`. It is called synchronously, from inside the
    callback that ended the answer: an asyncio future would defer the end (and the workstation's next request on
    this connection) to the next turn of a loop that may be busy with dozens of other streams.
    """

    def __init__(
        self,
        client: ClientConnection,
        upstream: UpstreamConnection,
        result: RelayResult,
        *,
        extra_headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        first_byte_timeout: float,
        on_done: Callable[[Exception | None], None],
        on_crash: Callable[[Exception], None] = _reraise,
        framed: bool = True,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.result = result
        self.extra_headers = extra_headers
        self.keep_alive = keep_alive and framed
        self.framed = framed  # False for an HTTP/1.0 workstation: raw stream, ended by closing
        self.on_done = on_done
        self.on_crash = on_crash
        self.finished = False
        self._streaming = False
        self._head = b""
        self._write = client.write
        self._ctype = b""
        self._tail = b""  # the last piece relayed and the one before (their end is checked for [DONE])
        self._before_tail = b""
        self._first_byte_deadline = time.monotonic() + first_byte_timeout  # 0.0 once the answer has begun
        self.reads = 0  # upstream reads relayed; the stall watchdog compares it between its rounds
        self._watch = (-1, 0.0)  # (reads, monotonic time) when the watchdog last saw a change

    # --- upstream side ----------------------------------------------------------------------------------------------

    def on_headers(self, status: int, ctype: bytes) -> None:
        self._first_byte_deadline = 0.0
        self.result.status = status
        self._ctype = ctype
        if status == 200 and ctype.startswith(b"text/event-stream"):
            self._streaming = True
            transport = self.client.transport
            if transport is not None and not self.client.closed:
                self._write = transport.write
            headers = [(b"content-type", ctype), *self.extra_headers]
            if self.framed:
                headers.append((b"transfer-encoding", b"chunked"))
            # Written by flush() at the end of this read, together with the first event when it came along.
            self._head = response_head(200, headers, close=not self.keep_alive)
            self.result.headers_sent = True
            if self.client.paused:
                self.pause()

    def flush(self, ending: str | None = None) -> None:
        """Send what the last read from vLLM brought (``upstream.bodies``) as one HTTP chunk (with the response head
        before it if that is not sent yet). With ``ending`` (the failure to report if the answer did not reach
        ``[DONE]``), close the chunked answer in the same write."""
        if not self._streaming:
            return
        bodies = self.upstream.bodies
        if bodies:
            data = bodies[0] if len(bodies) == 1 else b"".join(bodies)
            bodies.clear()
            self.reads += 1
            if self.result.ttfb is None:
                self.result.ttfb = time.perf_counter()
            out = b"%b%x\r\n%b\r\n" % (self._head, len(data), data) if self.framed else self._head + data
            if data.find(b'"prompt_tokens"') >= 0:  # not ``in``: bytes' ``in`` first tries the needle as an int
                _tokens(self.result, data)
            self._before_tail, self._tail = self._tail, data
        else:
            out = self._head
        self._head = b""
        if ending is not None:
            self.client.write(out + self._last_chunk(ending))
        elif out:
            self._write(out)

    def on_complete(self) -> None:
        if self._streaming:
            self.flush("upstream ended the stream without [DONE]")
        else:
            body = b"".join(self.upstream.bodies)
            self.upstream.bodies.clear()
            self.result.ttfb = time.perf_counter()
            if self.result.status == 200:
                _tokens(self.result, body[-1024:])
                self.result.complete = True
            headers = [(b"content-type", self._ctype or b"application/json"), *self.extra_headers,
                       (b"content-length", b"%d" % len(body))]  # fmt: skip
            self.client.write(response_head(self.result.status, headers, close=not self.keep_alive) + body)
            self.result.headers_sent = True
        self._finish()

    def on_lost(self, got_response: bool) -> None:
        if self.finished:
            return
        if self._streaming:
            self.flush("upstream stopped mid-stream (connection lost)")
            self._finish()
        elif not got_response:
            self._finish(UpstreamUnavailableError("the connection closed before an answer"))
        else:
            self._finish(UpstreamUnavailableError("the connection closed in the middle of the answer"))

    def check_timeouts(self, now: float, limit: float) -> bool:
        """End a request with no answer by its first-byte deadline, or a started stream that brought no byte for
        ``limit`` seconds (the watchdog calls this every few seconds). True if it ended it."""
        if self.finished:
            return False
        if self._first_byte_deadline and now >= self._first_byte_deadline:
            self._timeout()
            return True
        if not self._streaming:
            return False
        if self.reads != self._watch[0]:
            self._watch = (self.reads, now)
            return False
        if now - self._watch[1] < limit:
            return False
        self.upstream.sink = None
        self.upstream.close()  # vLLM aborts the request if it is still alive
        self.flush(f"no data from upstream for {limit:g} s mid-stream (stalled)")
        self._finish()
        return True

    def _delivered_done(self) -> bool:
        """The workstation has the whole answer: the last bytes relayed to it end with ``data: [DONE]``."""
        return self._streaming and (self._before_tail[-64:] + self._tail[-64:]).rstrip().endswith(_DONE)

    def _last_chunk(self, why: str) -> bytes:
        """What closes the chunked answer: the empty chunk after ``[DONE]`` (only vLLM's own was missing), else an
        error event first; ``why`` is the failure the audit log and the pool see."""
        if self._delivered_done():
            self.result.complete = True
            return b"0\r\n\r\n" if self.framed else b""
        self.result.failure = why
        if not self.framed:
            return _STREAM_FAILED
        return b"%x\r\n%b\r\n0\r\n\r\n" % (len(_STREAM_FAILED), _STREAM_FAILED)

    def _timeout(self) -> None:
        self._first_byte_deadline = 0.0
        self.upstream.sink = None
        self.upstream.close()
        self._finish(UpstreamTimeoutError())

    def _finish(self, exc: Exception | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        on_done, self.on_done = self.on_done, _ignore  # the callback's closure holds this relay: break the cycle
        on_done(exc)

    def crash(self, exc: Exception) -> None:
        """A callback on this request's path raised: drop vLLM's connection and hand the failure to the owner."""
        self.finished = True
        self.on_done = _ignore
        self.upstream.sink = None
        self.upstream.close()
        self.on_crash(exc)

    # --- client side (FlowTarget) -----------------------------------------------------------------------------------

    def pause(self) -> None:
        if self.upstream.transport is not None and not self.upstream.closed:
            self.upstream.transport.pause_reading()

    def resume(self) -> None:
        if self.upstream.transport is not None and not self.upstream.closed:
            self.upstream.transport.resume_reading()

    def client_gone(self) -> None:
        if self._delivered_done():
            # The workstation read the whole answer up to [DONE] and hung up before vLLM's closing empty chunk came
            # (the openai SDK closes the response at [DONE]): the answer was delivered, nothing was cut short.
            self.result.complete = True
        else:
            self.result.client_gone = True
        self.upstream.sink = None
        self.upstream.close()  # vLLM sees the disconnect and aborts the generation
        self._finish()
