"""The one small interface behind the dashboard and ``clinic-edge status``: a source has a ``name`` and ``read()``.

``read()`` never raises for the problems a source expects (a service down, systemd absent, a file missing); the
part it returns says why in ``error``. :func:`read_part` also catches the unexpected, so one broken source can never
take the others down. Live sources are built from :class:`TelemetryOptions`; tests build the same classes over
recorded data (``appliance.telemetry.replay``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from appliance.telemetry.certificate import CertificatePart, CertificateSource
from appliance.telemetry.config import ConfigSource, read_plan, replica_urls
from appliance.telemetry.gateway import GatewaySource
from appliance.telemetry.http import make_fetch
from appliance.telemetry.memory import MemorySource
from appliance.telemetry.parts import (
    ConfigPart,
    GatewayPart,
    MemoryPart,
    SelftestPart,
    UnitsPart,
    VllmPart,
)
from appliance.telemetry.selftest_files import SelftestSource
from appliance.telemetry.systemd import JournalResult, SystemdSource, clinic_edge_units
from appliance.telemetry.vllm import VllmSource

__all__ = [
    "PART_NAMES",
    "Snapshot",
    "Source",
    "Sources",
    "TelemetryOptions",
    "collect",
    "live_sources",
    "read_part",
]

PartT_co = TypeVar("PartT_co", covariant=True)


class Source(Protocol[PartT_co]):
    """Anything that can read one part of the snapshot."""

    name: str

    def read(self) -> PartT_co:
        """Read once; report expected failures in the part's ``error``."""
        ...


@dataclass
class Sources:
    """The sources of a snapshot, plus the journal reader and the clock (both replaceable in tests)."""

    config: Source[ConfigPart]
    memory: Source[MemoryPart]
    vllm: Source[VllmPart]
    gateway: Source[GatewayPart]
    units: Source[UnitsPart]
    selftest: Source[SelftestPart]
    journal: Callable[[str, int], JournalResult]
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    # Defaults to nothing to watch, so recorded scenarios (which have no certificate) read as before.
    certificate: Source[CertificatePart] = field(default_factory=CertificateSource)

    def by_name(self) -> dict[str, Source[Any]]:
        """Sources keyed by part name, in panel order."""
        return {name: getattr(self, name) for name in PART_NAMES}


PART_NAMES = ("config", "memory", "vllm", "gateway", "units", "selftest", "certificate")
_EMPTY: dict[str, Callable[[str], Any]] = {
    "config": lambda e: ConfigPart(error=e),
    "memory": lambda e: MemoryPart(error=e),
    "vllm": lambda e: VllmPart(error=e),
    "gateway": lambda e: GatewayPart(error=e),
    "units": lambda e: UnitsPart(error=e),
    "selftest": lambda e: SelftestPart(error=e),
    "certificate": lambda e: CertificatePart(error=e),
}


def read_part(name: str, source: Source[Any]) -> Any:
    """``source.read()``, with any unexpected exception turned into an error part (never propagated)."""
    try:
        return source.read()
    except Exception as exc:  # a bug or surprise in one source must not stop the others
        return _EMPTY[name](f"{name} source failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Snapshot:
    """Everything the dashboard shows, read once."""

    taken_at: datetime
    config: ConfigPart
    memory: MemoryPart
    vllm: VllmPart
    gateway: GatewayPart
    units: UnitsPart
    selftest: SelftestPart
    certificate: CertificatePart = field(default_factory=CertificatePart)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out: dict[str, Any] = {"taken_at": self.taken_at.isoformat()}
        for name in PART_NAMES:
            out[name] = getattr(self, name).to_dict()
        return out


def collect(sources: Sources) -> Snapshot:
    """Read every source once (sequentially: ``status`` is a one-shot; the dashboard reads them in parallel)."""
    parts = {name: read_part(name, source) for name, source in sources.by_name().items()}
    return Snapshot(taken_at=sources.clock(), **parts)


@dataclass
class TelemetryOptions:
    """Where the data lives; every path and URL can be overridden from the command line."""

    etc_dir: Path = Path("/etc/clinic-edge")
    state_dir: Path = Path("/var/lib/clinic-edge")
    gateway_url: str | None = "https://127.0.0.1:8443"
    vllm_urls: list[str] | None = None  # None: the plan's replicas on 127.0.0.1:8000+i
    ca_cert: Path | None = None  # None: ETC/tls/ca.crt when it exists
    timeout: float = 1.5
    hostname: str | None = None

    def resolved_vllm_urls(self) -> list[str]:
        """The vLLM URLs to watch: the ones given, else the plan's."""
        return list(self.vllm_urls) if self.vllm_urls else replica_urls(read_plan(self.etc_dir))

    def resolved_ca_cert(self) -> Path | None:
        """The CA that signed the gateway's certificate."""
        if self.ca_cert is not None:
            return self.ca_cert
        default = self.etc_dir / "tls" / "ca.crt"
        return default if default.is_file() else None


def live_sources(options: TelemetryOptions) -> Sources:
    """The real sources: NVML (via appliance.hardware), psutil, HTTP, systemctl, files."""
    fetch = make_fetch(timeout=options.timeout, ca_cert=options.resolved_ca_cert())
    urls = options.resolved_vllm_urls()
    units = SystemdSource(clinic_edge_units(len(urls)))
    return Sources(
        config=ConfigSource(options.etc_dir, options.hostname),
        memory=MemorySource(),
        vllm=VllmSource(urls, fetch),
        gateway=GatewaySource(options.gateway_url, fetch),
        units=units,
        selftest=SelftestSource(options.state_dir),
        journal=units.journal,
        certificate=CertificateSource(options.etc_dir / "tls" / "server.crt"),
    )
