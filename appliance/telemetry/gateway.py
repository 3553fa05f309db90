"""The gateway's readiness: ``GET /readyz`` → ``{"ready", "reasons", "upstreams"}`` (docs/interfaces.md)."""

from __future__ import annotations

import json
from typing import Any

from appliance.telemetry.http import Fetch, FetchError
from appliance.telemetry.parts import GatewayPart

__all__ = ["GatewaySource"]


class GatewaySource:
    """Reads ``/readyz``; a 503 is an answer (not ready, with reasons), no answer is an error."""

    name = "gateway"

    def __init__(self, url: str | None, fetch: Fetch) -> None:
        self.url = url.rstrip("/") if url else None
        self._fetch = fetch

    def read(self) -> GatewayPart:
        """The gateway's readiness and its reasons."""
        if not self.url:
            return GatewayPart(error="no gateway URL configured (--gateway)")
        try:
            answer = self._fetch(f"{self.url}/readyz")
        except FetchError as exc:
            return GatewayPart(url=self.url, ready=False, error=f"/readyz: {exc}")
        try:
            doc: Any = json.loads(answer.body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return GatewayPart(
                url=self.url, ready=False, error=f"/readyz answered {answer.status} without the JSON document"
            )
        reasons = [str(r) for r in doc.get("reasons") or [] if r]
        upstreams = [u for u in doc.get("upstreams") or [] if isinstance(u, dict)]
        ready = bool(doc.get("ready")) and answer.status == 200
        return GatewayPart(url=self.url, ready=ready, reasons=reasons, upstreams=upstreams)
