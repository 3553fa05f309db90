"""The audit log: one JSON line per request, with facts about it and never its content.

Fields: ``time`` (UTC ISO-8601), ``request_id``, ``key`` (the key's *name*), ``route``, ``status``, ``reason`` (why it
was refused or failed, else null), ``upstream``, ``stream``, ``images``, ``image_bytes``, ``prompt_tokens``,
``completion_tokens`` (when vLLM reported them), ``dicom`` (one summary per DICOM image converted, e.g. ``"dicom,
2440×1292, 12 bit, JPEG-LS, 38 ms"``: sizes and codec, never a header value), ``ttfb_ms`` (first byte sent to the
workstation) and ``duration_ms``. Prompts, answers, images and keys are never written.

Lines are written at the end of the event-loop turn that produced them, all of that turn's lines in one ``write``:
under load dozens of requests end in one turn, and a system call per line was a measurable part of the gateway's
cost per request. Nothing waits longer than that turn; :meth:`AuditLog.close` writes what is left.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_FIELDS", "AuditLog"]

AUDIT_FIELDS = (
    "time", "request_id", "key", "route", "status", "reason", "upstream", "stream", "images", "image_bytes", "dicom",
    "prompt_tokens", "completion_tokens", "ttfb_ms", "duration_ms",
)  # fmt: skip
_ENCODER = json.JSONEncoder(separators=(",", ":"))


class AuditLog:
    """Appends JSON lines to a file (0640, created if needed) or to standard error when no file is set."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._pending: list[str] = []
        self._second = -1  # the whole second whose ISO text is cached in _stamp
        self._stamp = ""
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # used outside the gateway's loop: write each line at once
            self._loop = None

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record for this loop turn's write (only the known fields: content cannot slip in)."""
        line = dict(zip(AUDIT_FIELDS, map(record.get, AUDIT_FIELDS), strict=True))
        second = int(record.get("time") or time.time())
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        line["time"] = self._stamp
        self._pending.append(_ENCODER.encode(line))
        if len(self._pending) > 1:
            return  # a flush is already scheduled for this turn
        if self._loop is None or self._loop.is_closed():
            self.flush()
        else:
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the queued lines now."""
        if not self._pending:
            return
        data = "\n".join(self._pending) + "\n"
        self._pending.clear()
        if self._fd is None:
            sys.stderr.write(data)
            sys.stderr.flush()
            return
        try:
            view = memoryview(data.encode())
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:  # a full disk must not take the gateway down; say so (no content in the line)
            sys.stderr.write(f"clinic-edge gateway: cannot write the audit log {self.path}: {err.strerror}\n")

    def close(self) -> None:
        """Write what is queued and close the file (not standard error)."""
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
