"""The self-test's HTTP side: one streamed chat request → a timeline, and the readiness probes before a run.

Timing follows ``vllm bench serve``'s request function: aiohttp, ``time.perf_counter`` taken just before the POST,
the body read with ``iter_any()``, and each SSE event stamped the moment the parser hands it over (before its JSON
is decoded). The SSE framing and the event kinds come from :mod:`appliance.wire`, the module the gateway uses.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from appliance.errors import InputError, UnreachableError, UsageError
from appliance.selftest.metrics import RequestTimeline, StreamEvent
from appliance.wire import SSEParser, classify

__all__ = [
    "Target",
    "TargetInfo",
    "make_session",
    "open_connections",
    "probe_target",
    "stream_chat",
]

CHAT_PATH = "/v1/chat/completions"
# One request never runs longer than this (a long prefill on a loaded box takes seconds, not minutes).
DEFAULT_REQUEST_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Target:
    """Where to send requests: the gateway (end to end) or vLLM directly."""

    url: str
    api_key: str | None = None
    ca_cert: Path | None = None
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(
                f"--target {self.url!r} is not an http(s) URL.",
                "Give the gateway's URL (e.g. https://clinic-box:8443) or vLLM's (e.g. http://127.0.0.1:8000).",
            )
        if self.ca_cert is not None and not self.ca_cert.is_file():
            raise InputError(
                f"--ca-cert {self.ca_cert} does not exist or is not a file.",
                "Point --ca-cert at the clinic CA certificate (on the box: /etc/clinic-edge/tls/ca.crt).",
            )

    @property
    def base(self) -> str:
        """The URL without a trailing slash or ``/v1``."""
        base = self.url.rstrip("/")
        return base[: -len("/v1")] if base.endswith("/v1") else base

    @property
    def chat_url(self) -> str:
        """The chat-completions endpoint."""
        return self.base + CHAT_PATH

    def headers(self) -> dict[str, str]:
        """Request headers (the key as a bearer token when there is one)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def ssl_context(self) -> ssl.SSLContext | bool:
        """TLS settings: the clinic CA when given, the system's trust store otherwise."""
        if self.ca_cert is not None:
            return ssl.create_default_context(cafile=str(self.ca_cert))
        return True


def make_session(target: Target, concurrency: int) -> aiohttp.ClientSession:
    """A session shaped like ``vllm bench serve``'s: a pool of ``concurrency`` keep-alive connections.

    ``trust_env`` is off (unlike vLLM's): an ``http_proxy`` in the environment must never divert the self-test's
    traffic away from the box it is measuring.
    """
    connector = aiohttp.TCPConnector(
        limit=concurrency,
        limit_per_host=concurrency,
        keepalive_timeout=60,
        enable_cleanup_closed=True,
        force_close=False,
        ssl=target.ssl_context(),
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=target.request_timeout_s),
        trust_env=False,
    )


async def open_connections(session: aiohttp.ClientSession, target: Target, count: int) -> None:
    """Open ``count`` keep-alive connections before the clock starts (``GET /healthz`` on each, concurrently).

    A workstation's SDK keeps its connections open, so the TCP and TLS handshakes are not part of the TTFT it
    feels; without this, the first ``count`` requests of a load point would carry them (``vllm bench serve``'s
    do, which matters only for its first wave). ``/healthz`` is the gateway's liveness route: it needs no key, is
    not proxied and leaves the audit log alone; vLLM answers it 404, which keeps the connection open all the same.
    """

    async def one() -> None:
        try:
            async with session.get(target.base + "/healthz") as resp:
                await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass  # the load point itself will record what is wrong

    await asyncio.gather(*(one() for _ in range(count)))


async def stream_chat(session: aiohttp.ClientSession, target: Target, body: Mapping[str, Any]) -> RequestTimeline:
    """Send one streamed chat request and record its timeline. Never raises for network or server errors."""
    payload = json.dumps(body).encode()
    headers = target.headers()
    st = time.perf_counter()
    tl = RequestTimeline(start=st)
    try:
        async with session.post(target.chat_url, data=payload, headers=headers) as resp:
            tl.status = resp.status
            if resp.status != 200:
                tl.error = f"HTTP {resp.status}: {_error_text(await resp.read())}"
                return tl
            parser = SSEParser()
            async for chunk in resp.content.iter_any():
                for data in parser.feed(chunk):
                    _record(tl, data)
            for data in parser.close():
                _record(tl, data)
    except (aiohttp.ClientError, OSError) as exc:
        tl.error = f"{type(exc).__name__}: {exc}".strip()
    except TimeoutError:
        tl.error = f"no complete answer within {target.request_timeout_s:g} s (request timeout)"
    finally:
        tl.end = time.perf_counter()
    return tl


def _record(tl: RequestTimeline, data: bytes) -> None:
    t = time.perf_counter()
    chunk = classify(data)
    error = None
    if chunk.kind == "error" and chunk.error is not None:
        error = str(chunk.error.get("message") or chunk.error)[:300]
    tl.events.append(
        StreamEvent(
            t=t,
            kind=chunk.kind,
            has_content=bool(chunk.content),
            usage=chunk.usage,
            error=error,
            has_reasoning=bool(chunk.reasoning),
        )
    )


def _error_text(body: bytes) -> str:
    """The ``error.message`` of an OpenAI-shaped body (vLLM's and the gateway's), bounded; else the raw start."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace").strip() or "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(obj)[:300]


@dataclass(frozen=True)
class TargetInfo:
    """What the probes learned about the target before a run."""

    kind: str  # "gateway" (answers /readyz) or "vllm"
    models: list[str]
    model_cards: list[dict[str, Any]] = field(default_factory=list)
    readiness: dict[str, Any] | None = None

    def card(self, model: str) -> dict[str, Any]:
        """The ``/v1/models`` entry of ``model`` (``root`` is vLLM's model path, ``max_model_len`` its limit)."""
        return next((c for c in self.model_cards if c.get("id") == model), {})


async def probe_target(target: Target) -> TargetInfo:
    """Check the target is up and ready; raise :class:`UnreachableError` (exit 2) with what to check if not."""
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
    connector = aiohttp.TCPConnector(ssl=target.ssl_context())
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        kind, readiness = await _readiness(session, target)
        cards = await _models(session, target)
    return TargetInfo(
        kind=kind,
        models=[str(c.get("id")) for c in cards if c.get("id")],
        model_cards=cards,
        readiness=readiness,
    )


async def _get(session: aiohttp.ClientSession, target: Target, path: str) -> tuple[int, bytes]:
    try:
        async with session.get(target.base + path, headers=target.headers()) as resp:
            return resp.status, await resp.read()
    except aiohttp.ClientConnectorCertificateError as exc:
        raise UnreachableError(
            f"{target.base} presented a TLS certificate we do not trust ({exc.certificate_error}).",
            "Pass the clinic CA with --ca-cert /etc/clinic-edge/tls/ca.crt, and check the URL's host name is one "
            "the certificate was made for ('clinic-edge tls ensure --name ...').",
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise UnreachableError(
            f"{target.base} is unreachable: {type(exc).__name__}: {exc}",
            "Check the service runs ('systemctl status clinic-edge-gateway clinic-edge-vllm@0'), that the URL and "
            "port are right, and that no firewall blocks it.",
        ) from exc
    except TimeoutError as exc:
        raise UnreachableError(
            f"{target.base} did not answer {path} within {PROBE_TIMEOUT_S:g} s.",
            "The service may be overloaded or hung; check 'clinic-edge status' and the service logs "
            "('journalctl -u clinic-edge-gateway -u clinic-edge-vllm@0').",
        ) from exc


async def _readiness(session: aiohttp.ClientSession, target: Target) -> tuple[str, dict[str, Any] | None]:
    """The gateway answers ``/readyz``; vLLM answers ``/health``. Not ready → :class:`UnreachableError`."""
    status, body = await _get(session, target, "/readyz")
    if status in (200, 503):
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and "ready" in doc:
            if status != 200 or not doc.get("ready"):
                reasons = "; ".join(str(r) for r in doc.get("reasons") or []) or "no reason given"
                raise UnreachableError(
                    f"The gateway at {target.base} is not ready: {reasons}.",
                    "Wait for vLLM to finish loading the model (it can take minutes after a restart), then check "
                    "'systemctl status clinic-edge-vllm@0' and 'journalctl -u clinic-edge-vllm@0'.",
                    details={"readyz": doc},
                )
            return "gateway", doc
    status, _ = await _get(session, target, "/health")
    if status == 200:
        return "vllm", None
    raise UnreachableError(
        f"{target.base} answered /readyz and /health with HTTP {status}: it is not ready.",
        "If this is vLLM, it is still loading or its engine died: check 'journalctl -u clinic-edge-vllm@0'. If it is "
        "the gateway, check 'systemctl status clinic-edge-gateway'.",
    )


async def _models(session: aiohttp.ClientSession, target: Target) -> list[dict[str, Any]]:
    status, body = await _get(session, target, "/v1/models")
    if status in (401, 403):
        raise UnreachableError(
            f"{target.base} refused the API key (HTTP {status}).",
            "Give a valid workstation key with --api-key or the CLINIC_EDGE_API_KEY environment variable "
            "('clinic-edge keys add selftest' makes one).",
        )
    if status != 200:
        raise UnreachableError(
            f"{target.base}/v1/models answered HTTP {status}: {_error_text(body)}",
            "Check the service logs ('journalctl -u clinic-edge-gateway -u clinic-edge-vllm@0').",
        )
    try:
        data = json.loads(body).get("data") or []
    except (ValueError, AttributeError):
        data = []
    cards = [c for c in data if isinstance(c, dict)]
    if not cards:
        raise UnreachableError(
            f"{target.base}/v1/models lists no model.",
            "vLLM serves no model yet; check 'journalctl -u clinic-edge-vllm@0'.",
        )
    return cards
