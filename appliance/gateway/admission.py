"""Admission control: a per-key cap on concurrent requests, a global in-flight cap and a bounded wait.

A request that finds both caps free starts at once (no await, no allocation). Otherwise it waits, at most
``queue_timeout`` seconds and behind at most ``max_queue`` others, for a slot; beyond that it is refused with a
reason (the gateway answers 429 with ``Retry-After``). vLLM's own queue is unbounded, so refusing early keeps the
latency of admitted requests predictable.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

__all__ = ["Admission"]


class Admission:
    """Counts in-flight requests per key and in total; see the module docstring."""

    def __init__(self, max_inflight: int, max_per_key: int, queue_timeout: float, max_queue: int) -> None:
        self.max_inflight = max_inflight
        self.max_per_key = max_per_key
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue
        self.inflight = 0
        self.per_key: dict[str, int] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    def _try(self, key: str) -> bool:
        if self.inflight >= self.max_inflight or self.per_key.get(key, 0) >= self.max_per_key:
            return False
        self.inflight += 1
        self.per_key[key] = self.per_key.get(key, 0) + 1
        return True

    def _reason(self, key: str) -> str:
        return "per_key_limit" if self.per_key.get(key, 0) >= self.max_per_key else "gateway_busy"

    def try_acquire(self, key: str) -> bool:
        """Take a slot for ``key`` if one is free now and nobody waits (then :meth:`release` it once)."""
        return not self._waiters and self._try(key)

    async def acquire(self, key: str) -> str | None:
        """Take a slot for ``key``: None when admitted, else the reason (``per_key_limit``, ``gateway_busy``,
        ``queue_full``). Every admitted request must call :meth:`release` exactly once."""
        if not self._waiters and self._try(key):
            return None
        if len(self._waiters) >= self.max_queue:
            return "queue_full"
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.queue_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._reason(key)
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                return self._reason(key)
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)
            if self._try(key):
                return None

    def release(self, key: str) -> None:
        """Give back a slot and let every waiter check again."""
        self.inflight -= 1
        left = self.per_key.get(key, 1) - 1
        if left:
            self.per_key[key] = left
        else:
            self.per_key.pop(key, None)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
