"""The OpenAI chat-completions wire format and Server-Sent Events, shared by the gateway and the self-test.

One module, so the gateway and the self-test can never disagree on what a stream looks like:

* :class:`SSEParser` turns arbitrary byte chunks into complete ``data:`` payloads (bytes, untouched).
* :func:`classify` tells what one payload is: ``role`` (vLLM's first, role-only chunk), ``content``, ``usage``
  (the ``include_usage`` chunk with ``choices: []``), ``error`` (sent after the 200 header) or ``done``.
* :func:`error_body` / :func:`sse_error_event` build OpenAI-shaped errors, so a workstation's SDK shows our text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DONE",
    "DONE_EVENT",
    "ChunkKind",
    "ParsedChunk",
    "SSEParser",
    "chat_request",
    "classify",
    "error_body",
    "sse_error_event",
]

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"

ChunkKind = Literal["role", "content", "usage", "error", "done", "other"]


class SSEParser:
    """Incremental Server-Sent Events parser that yields each event's ``data`` as bytes.

    Handles events split across reads, several events in one read, CRLF or LF line ends, and multi-line data
    (joined with ``\\n`` as the SSE spec says). Comment lines (``:``) and other fields are ignored.
    """

    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Add bytes; yield the data of every event they complete."""
        buf = self._buf + chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    yield b"\n".join(self._data)
                    self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        self._buf = buf[start:]

    def close(self) -> Iterator[bytes]:
        """Flush an event left unterminated when the stream ended."""
        if self._buf.startswith(b"data:"):
            value = self._buf[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        self._buf = b""
        if self._data:
            yield b"\n".join(self._data)
            self._data = []


@dataclass(frozen=True, slots=True)
class ParsedChunk:
    """One streamed payload, decoded."""

    kind: ChunkKind
    content: str = ""  # the answer's text
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    finish_reason: str | None = None
    reasoning: str = ""  # a reasoning model's thinking (vLLM's reasoning parser), not part of the answer

    @property
    def has_choices(self) -> bool:
        """True for events that ``vllm bench serve`` counts for TTFT (non-empty ``choices``)."""
        return self.kind in ("role", "content")


def classify(data: bytes) -> ParsedChunk:
    """Decode one SSE ``data`` payload of a streamed chat completion."""
    if data.strip() == DONE:
        return ParsedChunk("done")
    try:
        obj = json.loads(data)
    except ValueError:
        return ParsedChunk("error", error={"message": "the server sent an event that is not JSON"})
    if not isinstance(obj, dict):
        return ParsedChunk("other")
    if "error" in obj:
        err = obj["error"]
        return ParsedChunk("error", error=err if isinstance(err, dict) else {"message": str(err)})
    choices = obj.get("choices") or []
    usage = obj.get("usage")
    if not choices:
        return ParsedChunk("usage" if usage else "other", usage=usage)
    first = choices[0] if isinstance(choices[0], dict) else {}
    delta = first.get("delta") or {}
    text = delta.get("content") or ""
    reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    finish = first.get("finish_reason")
    # vLLM's first chunk carries only the role; later chunks may carry empty text (a token that decodes to
    # nothing yet, e.g. half of a multi-byte character) and still count as content events.
    kind: ChunkKind = "role" if delta.get("role") and not text and not reasoning and not finish else "content"
    if not isinstance(text, str) or not isinstance(reasoning, str):
        text, reasoning = str(text), str(reasoning)
    return ParsedChunk(kind, content=text, usage=usage, finish_reason=finish, reasoning=reasoning)


def error_body(message: str, *, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error body; the SDK surfaces ``message`` to the workstation developer."""
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}


def sse_error_event(message: str, *, code: str = "upstream_error") -> bytes:
    """An error event for a stream whose 200 header is already sent, followed by ``[DONE]``."""
    body = json.dumps(error_body(message, type_="server_error", code=code), separators=(",", ":")).encode()
    return b"data: " + body + b"\n\n" + DONE_EVENT


def chat_request(
    model: str,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    stream: bool = True,
    include_usage: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """A chat-completions request body as the workstation and the self-test send it."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    if stream and include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body
