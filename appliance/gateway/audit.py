"""The audit log: one JSON line per request, with facts about it and never its content.

Fields: ``time`` (UTC ISO-8601), ``request_id``, ``key`` (the key's *name*), ``route``, ``status``, ``reason`` (why
it was refused or failed, else null), ``upstream``, ``stream``, ``images``, ``image_bytes``, ``prompt_tokens``,
``completion_tokens`` (when vLLM reported them), ``ttfb_ms`` (first byte sent to the workstation) and
``duration_ms``. Prompts, answers, images and keys are never written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

__all__ = ["AUDIT_FIELDS", "AuditLog"]

AUDIT_FIELDS = (
    "time", "request_id", "key", "route", "status", "reason", "upstream", "stream", "images", "image_bytes",
    "prompt_tokens", "completion_tokens", "ttfb_ms", "duration_ms",
)  # fmt: skip


class AuditLog:
    """Appends JSON lines to a file (0640, created if needed) or to standard error when no file is set."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._out: TextIO
        if path is None:
            self._out = sys.stderr
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._out = os.fdopen(fd, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """Write one record (only the known fields; unknown keys are dropped so content cannot slip in)."""
        line = {k: record.get(k) for k in AUDIT_FIELDS}
        line["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.get("time") or time.time()))
        self._out.write(json.dumps(line, separators=(",", ":")) + "\n")

    def close(self) -> None:
        """Close the file (not standard error)."""
        if self.path is not None:
            self._out.close()
