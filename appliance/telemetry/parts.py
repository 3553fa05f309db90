"""The parts of a telemetry snapshot: one frozen dataclass per data source, each carrying ``error``.

``error`` is ``None`` when the source answered, or one sentence saying why it did not (shown in place of the panel's
data; the other parts are unaffected). Every part has ``to_dict()`` for ``clinic-edge status --json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from appliance.hardware import HardwareSnapshot

__all__ = [
    "ConfigPart",
    "GatewayPart",
    "MemoryPart",
    "ReplicaStatus",
    "SelftestPart",
    "SelftestRun",
    "UnitStatus",
    "UnitsPart",
    "VllmPart",
    "VllmProcess",
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


class _Part:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (datetimes as ISO-8601 strings)."""
        result: dict[str, Any] = _jsonable(asdict(self))  # type: ignore[call-overload]
        return result


@dataclass(frozen=True)
class VllmProcess(_Part):
    """A process that belongs to a vLLM server (the API server or one of its engine workers)."""

    pid: int
    rss: int  # resident host memory, bytes
    name: str


@dataclass(frozen=True)
class MemoryPart(_Part):
    """Accelerator memory (via :mod:`appliance.hardware`) and the vLLM processes that hold it."""

    hardware: HardwareSnapshot | None = None
    vllm_processes: list[VllmProcess] = field(default_factory=list)
    error: str | None = None

    def vllm_pids(self) -> set[int]:
        """Process ids of every vLLM process found."""
        return {p.pid for p in self.vllm_processes}

    def vllm_rss(self) -> int:
        """Host memory resident in vLLM processes, bytes."""
        return sum(p.rss for p in self.vllm_processes)


@dataclass(frozen=True)
class ReplicaStatus(_Part):
    """One vLLM replica: ``/health`` and the gauges from ``/metrics`` (``None``: not read)."""

    url: str
    healthy: bool | None = None
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None  # fraction 0..1
    error: str | None = None


@dataclass(frozen=True)
class VllmPart(_Part):
    """Every vLLM replica the dashboard watches."""

    replicas: list[ReplicaStatus] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class GatewayPart(_Part):
    """The gateway's ``/readyz`` answer."""

    url: str = ""
    ready: bool | None = None
    reasons: list[str] = field(default_factory=list)
    upstreams: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class UnitStatus(_Part):
    """One systemd unit as ``systemctl show`` reports it."""

    name: str
    load_state: str = "unknown"
    active_state: str = "unknown"
    sub_state: str = ""
    since: datetime | None = None
    restarts: int | None = None
    result: str | None = None

    @property
    def is_timer(self) -> bool:
        """Timers are healthy when active (waiting)."""
        return self.name.endswith(".timer")

    @property
    def is_oneshot_job(self) -> bool:
        """The self-test service runs and exits: inactive with result ``success`` is its healthy state."""
        return self.name.startswith("clinic-edge-selftest") and self.name.endswith(".service")

    @property
    def healthy(self) -> bool:
        """Whether this unit is in the state it should be in."""
        if self.load_state == "not-found":
            return False
        if self.is_oneshot_job:
            return self.active_state in ("inactive", "active", "activating") and self.result in (None, "", "success")
        return self.active_state == "active"


@dataclass(frozen=True)
class UnitsPart(_Part):
    """The clinic-edge systemd units."""

    units: list[UnitStatus] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class SelftestRun(_Part):
    """The figures the dashboard shows from one self-test result file (schema 1; missing fields are ``None``)."""

    id: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    mode: str | None = None
    passed: bool | None = None
    reason: str = ""
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_p50_ms: float | None = None
    request_throughput: float | None = None
    output_throughput: float | None = None
    completed: int | None = None
    failed: int | None = None

    @property
    def when(self) -> datetime | None:
        """When the run ended (or started, if the end is missing)."""
        return self.finished_at or self.started_at


@dataclass(frozen=True)
class SelftestPart(_Part):
    """The latest self-test result and the history, oldest first."""

    latest: SelftestRun | None = None
    history: list[SelftestRun] = field(default_factory=list)
    directory: str = ""
    error: str | None = None


@dataclass(frozen=True)
class ConfigPart(_Part):
    """What the appliance is: host, endpoint, model, and the planner's summary."""

    hostname: str = ""
    endpoint: str | None = None
    model: str | None = None
    plan_verdict: str | None = None
    replicas: int | None = None
    tp: int | None = None
    max_model_len: int | None = None
    max_concurrency: float | None = None  # sessions of max_model_len tokens that fit per replica
    kv_cache_gib: float | None = None
    hardware: str | None = None
    error: str | None = None

    def plan_summary(self) -> str:
        """One line: verdict, topology, context and concurrency."""
        if self.plan_verdict is None:
            return "no plan"
        bits = [self.plan_verdict]
        if self.replicas is not None:
            bits.append(f"{self.replicas} replica{'s' if self.replicas != 1 else ''} × TP {self.tp or 1}")
        if self.max_model_len is not None:
            bits.append(f"ctx {self.max_model_len}")
        if self.max_concurrency is not None:
            bits.append(f"{self.max_concurrency:g} × ctx per replica")
        if self.kv_cache_gib is not None:
            bits.append(f"KV {self.kv_cache_gib:.1f} GiB")
        if self.hardware:
            bits.append(self.hardware)
        return " · ".join(bits)
