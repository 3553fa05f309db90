"""The vLLM replicas behind the gateway: least-outstanding-requests balancing, ejection and re-admission by health.

Each :class:`Upstream` is *admitted* (it receives requests) or *ejected* (a connection to it failed, or it died in
the middle of a stream). A background loop checks every upstream every ``health_interval`` seconds:

* ``GET /health`` answers 200 and ``GET /v1/models`` lists a model → admitted again;
* and a generation succeeded within ``ready_window`` seconds → *ready*. vLLM's ``/health`` stays 200 through GPU
  hangs, so when no real request succeeded for ``probe_interval`` seconds the loop sends a 1-token probe itself.

``/readyz`` reports, per upstream, whether it is ready and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.wire import chat_request

__all__ = ["Pool", "Upstream"]

_PROBE_MESSAGES = [{"role": "user", "content": "ping"}]


@dataclass
class Upstream:
    """One vLLM server and what the gateway knows about it."""

    url: str
    inflight: int = 0
    admitted: bool = True
    reason: str = "not checked yet"
    health_ok: bool = False
    models: tuple[str, ...] = ()
    last_generation: float = 0.0  # monotonic time of the last successful generation (real or probe)
    checked: bool = False

    def ready(self, window: float, now: float) -> bool:
        """Can it generate, as far as we know?"""
        return self.admitted and self.health_ok and bool(self.models) and now - self.last_generation <= window

    def status(self, window: float, now: float) -> dict[str, Any]:
        """The ``/readyz`` entry for this upstream."""
        healthy = self.ready(window, now)
        reason = ""
        if not healthy:
            if not self.admitted or not self.health_ok or not self.models:
                reason = self.reason
            else:
                reason = self.reason or f"no successful generation in the last {window:.0f} s"
        return {"url": self.url, "healthy": healthy, "reason": reason}


class Pool:
    """The replicas, the balancing decision and the health loop."""

    def __init__(
        self,
        urls: list[str],
        *,
        health_interval: float,
        probe_interval: float,
        ready_window: float,
        api_key: str | None = None,
    ) -> None:
        self.upstreams = [Upstream(u.rstrip("/")) for u in urls]
        self.health_interval = health_interval
        self.probe_interval = probe_interval
        self.ready_window = ready_window
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._next = 0
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def pick(self, exclude: tuple[Upstream, ...] = ()) -> Upstream | None:
        """The admitted upstream with the fewest outstanding requests (ties rotate), or None."""
        best: Upstream | None = None
        n = len(self.upstreams)
        start = self._next
        self._next = (start + 1) % n
        for i in range(n):
            up = self.upstreams[(start + i) % n]
            if up.admitted and up not in exclude and (best is None or up.inflight < best.inflight):
                best = up
        return best

    def eject(self, up: Upstream, reason: str) -> None:
        """Stop sending requests to ``up`` until the health loop sees it well again."""
        up.admitted = False
        up.health_ok = False
        up.reason = reason

    def generation_ok(self, up: Upstream) -> None:
        """Record that ``up`` just produced a complete answer."""
        up.last_generation = time.monotonic()

    def readiness(self) -> dict[str, Any]:
        """The ``/readyz`` document: ``{"ready", "reasons", "upstreams": [{"url", "healthy", "reason"}]}``."""
        now = time.monotonic()
        entries = [u.status(self.ready_window, now) for u in self.upstreams]
        ready = any(e["healthy"] for e in entries)
        reasons = [] if ready else [f"{e['url']}: {e['reason']}" for e in entries]
        return {"ready": ready, "reasons": reasons, "upstreams": entries}

    def start(self, session: aiohttp.ClientSession) -> None:
        """Start the health loop (call inside the running event loop)."""
        self._session = session
        self._task = asyncio.create_task(self._loop(), name="clinic-edge-health")

    async def stop(self) -> None:
        """Stop the health loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self) -> None:
        """One round of checks on every upstream, concurrently."""
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.health_interval)

    async def _get_json(self, url: str) -> tuple[int, Any]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=5)
        async with self._session.get(url, headers=self._headers, timeout=timeout) as resp:
            body = await resp.read()
            try:
                return resp.status, json.loads(body) if body else None
            except ValueError:
                return resp.status, None

    async def _check(self, up: Upstream) -> None:
        up.checked = True
        try:
            status, _ = await self._get_json(up.url + "/health")
            if status != 200:
                self._fail(up, f"vLLM /health answered {status} (engine dead or starting)")
                return
            status, doc = await self._get_json(up.url + "/v1/models")
            models = tuple(m.get("id", "") for m in (doc or {}).get("data", []) if isinstance(m, dict))
            if status != 200 or not models:
                self._fail(up, f"vLLM /v1/models lists no model (HTTP {status})")
                return
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            self._fail(up, f"vLLM unreachable: {type(err).__name__}: {err}"[:200])
            return
        up.models = models
        up.health_ok = True
        if not up.admitted:
            up.admitted = True
        up.reason = ""
        if time.monotonic() - up.last_generation > self.probe_interval:
            await self._probe(up)

    def _fail(self, up: Upstream, reason: str) -> None:
        up.health_ok = False
        up.admitted = False
        up.reason = reason

    async def _probe(self, up: Upstream) -> None:
        """A 1-token generation: the only proof that the engine can still generate."""
        assert self._session is not None
        body = chat_request(up.models[0], _PROBE_MESSAGES, max_tokens=1, stream=False)
        timeout = aiohttp.ClientTimeout(total=max(self.ready_window / 2, 10))
        try:
            async with self._session.post(
                up.url + "/v1/chat/completions", json=body, headers=self._headers, timeout=timeout
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    self.generation_ok(up)
                else:
                    up.reason = f"probe generation answered HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            up.reason = f"probe generation failed: {type(err).__name__}"
