"""vLLM replicas: ``/health`` and the request and KV-cache gauges from ``/metrics`` (Prometheus text)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from appliance.telemetry.http import Fetch, FetchError
from appliance.telemetry.parts import ReplicaStatus, VllmPart

__all__ = ["KV_CACHE_GAUGES", "VllmSource", "parse_prometheus"]

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# vLLM renamed the gauge in v0.10; older servers (and some builds) still export the first name.
KV_CACHE_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_prometheus(text: str, names: Sequence[str]) -> dict[str, list[float]]:
    """The samples of each metric in ``names`` (one per label set), from Prometheus exposition text."""
    wanted = set(names)
    found: dict[str, list[float]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name not in wanted:
            continue
        rest = line[name_end:]
        if rest.startswith("{"):
            close = rest.rfind("}")
            rest = rest[close + 1 :] if close >= 0 else ""
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if not math.isnan(value):
            found.setdefault(name, []).append(value)
    return found


class VllmSource:
    """Reads every replica's ``/health`` and ``/metrics``; a replica that does not answer carries the reason."""

    name = "vllm"

    def __init__(self, urls: Sequence[str], fetch: Fetch) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._fetch = fetch

    def read(self) -> VllmPart:
        """One :class:`ReplicaStatus` per URL, in order."""
        if not self.urls:
            return VllmPart(error="no vLLM replica configured (no plan.json and no --vllm URL)")
        return VllmPart(replicas=[self._replica(url) for url in self.urls])

    def _replica(self, url: str) -> ReplicaStatus:
        try:
            health = self._fetch(f"{url}/health")
        except FetchError as exc:
            return ReplicaStatus(url=url, healthy=False, error=f"/health: {exc}")
        healthy = health.status == 200
        error = None if healthy else f"/health answered {health.status}"
        try:
            metrics = self._fetch(f"{url}/metrics")
        except FetchError as exc:
            return ReplicaStatus(url=url, healthy=healthy, error=error or f"/metrics: {exc}")
        if metrics.status != 200:
            return ReplicaStatus(url=url, healthy=healthy, error=error or f"/metrics answered {metrics.status}")
        samples = parse_prometheus(metrics.body, (RUNNING, WAITING, *KV_CACHE_GAUGES))
        kv = next((samples[n] for n in KV_CACHE_GAUGES if n in samples), None)
        return ReplicaStatus(
            url=url,
            healthy=healthy,
            running=sum(samples[RUNNING]) if RUNNING in samples else None,
            waiting=sum(samples[WAITING]) if WAITING in samples else None,
            kv_cache_usage=max(kv) if kv else None,
            error=error,
        )
