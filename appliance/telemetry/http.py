"""A tiny, bounded HTTP GET for the telemetry sources (loopback services: vLLM, the gateway).

Sources take a :data:`Fetch` callable so tests can replay recorded answers; :func:`http_get` is the live one.
Every request has a short timeout: a hung service must not stall the dashboard's refresh.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fetch", "FetchError", "HttpAnswer", "http_get", "make_fetch"]

MAX_BODY = 1 << 20  # a /metrics page of vLLM is ~30 KiB; never read more than this


@dataclass(frozen=True)
class HttpAnswer:
    """Status code and body text of one answer (any status: 503 from /readyz still carries reasons)."""

    status: int
    body: str


class FetchError(Exception):
    """The request got no HTTP answer: refused, timed out, TLS failed. The message says which, briefly."""


Fetch = Callable[[str], HttpAnswer]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        inner = exc.reason
        if isinstance(inner, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({inner.verify_message}); pass --ca-cert"
        if isinstance(inner, ConnectionRefusedError):
            return "connection refused (service not running?)"
        if isinstance(inner, TimeoutError):
            return "timed out"
        return str(inner)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def http_get(
    url: str, *, timeout: float = 1.5, ca_cert: Path | None = None, context: ssl.SSLContext | None = None
) -> HttpAnswer:
    """GET ``url``; raise :class:`FetchError` when there is no HTTP answer at all."""
    if url.startswith("https:") and context is None:
        context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
    request = urllib.request.Request(url, headers={"Accept": "application/json, text/plain"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            return HttpAnswer(int(response.status), response.read(MAX_BODY).decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        body = exc.read(MAX_BODY).decode("utf-8", "replace") if exc.fp else ""
        return HttpAnswer(int(exc.code), body)
    except (OSError, ValueError) as exc:
        raise FetchError(_reason(exc)) from exc


def make_fetch(*, timeout: float = 1.5, ca_cert: Path | None = None) -> Fetch:
    """A :data:`Fetch` with fixed timeout and trust anchor (one TLS context: loading CAs costs ~20 ms of CPU)."""
    contexts: list[ssl.SSLContext] = []

    def fetch(url: str) -> HttpAnswer:
        if url.startswith("https:") and not contexts:
            try:
                contexts.append(ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None))
            except (OSError, ssl.SSLError) as exc:
                raise FetchError(f"cannot load the CA certificate {ca_cert}: {exc}") from exc
        return http_get(url, timeout=timeout, context=contexts[0] if contexts else None)

    return fetch
