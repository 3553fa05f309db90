"""Relaying one request to a vLLM upstream and its answer back, bytes untouched.

The streaming path sends each piece of the upstream body to the workstation the moment aiohttp hands it over
(``iter_any``: whatever arrived, no line splitting, no re-serialisation). The gateway only peeks at the bytes for the
audit log's token counts (a substring test per chunk) and for ``[DONE]`` at the end.

Failures map to precise answers:

* connection refused or reset before the request was sent → the caller tries another replica, then 503;
* the upstream stops in the middle of a stream → an SSE error event and ``[DONE]`` (the 200 is already sent);
* the workstation disconnects → the caller cancels this coroutine; the ``finally`` closes the upstream
  connection, which makes vLLM abort the generation.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.wire import DONE_EVENT, sse_error_event

__all__ = ["RelayResult", "UpstreamUnavailableError", "relay_chat", "relay_get"]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_PROMPT_RE = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_RE = re.compile(rb'"completion_tokens":\s*(\d+)')
_PASS_HEADERS = (b"content-type",)


class UpstreamUnavailableError(Exception):
    """The upstream could not be reached before anything was sent (safe to try another replica)."""


@dataclass
class RelayResult:
    """What happened, for the audit log and the pool."""

    status: int = 0
    ttfb: float | None = None  # perf_counter when the first body byte went to the workstation
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    complete: bool = False  # a full answer was relayed (the upstream can generate)
    failure: str | None = None  # why the stream ended badly
    headers_sent: bool = False


def _tokens(result: RelayResult, data: bytes) -> None:
    m = _PROMPT_RE.search(data)
    if m:
        result.prompt_tokens = int(m.group(1))
    m = _COMPLETION_RE.search(data)
    if m:
        result.completion_tokens = int(m.group(1))


async def relay_chat(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    headers: dict[str, str],
    response_headers: list[tuple[bytes, bytes]],
    send: Send,
    result: RelayResult,
    timeout: aiohttp.ClientTimeout,
) -> None:
    """POST ``body`` to ``url`` and relay the answer to ``send``; fills ``result``. See the module docstring."""
    try:
        resp = await session.post(url, data=body, headers=headers, timeout=timeout)
    except (aiohttp.ClientConnectionError, OSError) as err:
        raise UpstreamUnavailableError(f"{type(err).__name__}: {err}") from err
    try:
        result.status = resp.status
        out_headers = [(k, v) for k, v in resp.raw_headers if k.lower() in _PASS_HEADERS]
        streaming = resp.status == 200 and resp.content_type == "text/event-stream"
        if not streaming:
            data = await resp.read()
            if resp.status == 200:
                _tokens(result, data[-512:])
                result.complete = True
            out_headers.append((b"content-length", str(len(data)).encode()))
            await send(
                {"type": "http.response.start", "status": resp.status, "headers": out_headers + response_headers}
            )
            result.headers_sent = True
            result.ttfb = time.perf_counter()
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return
        await send({"type": "http.response.start", "status": 200, "headers": out_headers + response_headers})
        result.headers_sent = True
        tail = b""
        try:
            async for chunk in resp.content.iter_any():
                if result.ttfb is None:
                    result.ttfb = time.perf_counter()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if b'"prompt_tokens"' in chunk:
                    _tokens(result, chunk)
                tail = chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            result.failure = f"upstream stopped mid-stream ({type(err).__name__})"
        else:
            if tail.endswith(DONE_EVENT) or tail.rstrip().endswith(b"data: [DONE]"):
                result.complete = True
            else:
                result.failure = "upstream ended the stream without [DONE]"
        if result.failure is not None:
            event = sse_error_event(
                "The model server stopped in the middle of this answer; the answer is incomplete. Retry the "
                "request; if it keeps happening, check the appliance dashboard.",
                code="upstream_stream_failed",
            )
            await send({"type": "http.response.body", "body": event, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if result.complete:
            resp.release()
        else:
            resp.close()  # drop the connection: vLLM sees the disconnect and aborts the request


async def relay_get(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str],
    response_headers: list[tuple[bytes, bytes]],
    send: Send,
    timeout: aiohttp.ClientTimeout,
) -> int:
    """GET ``url`` (e.g. ``/v1/models``) and relay the small answer; returns the status."""
    try:
        async with session.get(url, headers=headers, timeout=timeout) as resp:
            data = await resp.read()
            out = [(k, v) for k, v in resp.raw_headers if k.lower() in _PASS_HEADERS]
            out.append((b"content-length", str(len(data)).encode()))
            await send({"type": "http.response.start", "status": resp.status, "headers": out + response_headers})
            await send({"type": "http.response.body", "body": data, "more_body": False})
            return resp.status
    except (aiohttp.ClientConnectionError, OSError) as err:
        raise UpstreamUnavailableError(f"{type(err).__name__}: {err}") from err
