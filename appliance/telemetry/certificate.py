"""The gateway's server certificate: when it expires, so ``status`` and the dashboard can warn in time.

Workstations refuse an expired certificate, so a box that was healthy yesterday answers nobody today; the warning
starts when ``tls ensure`` would re-issue it anyway (:data:`appliance.tls.RENEW_BEFORE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.errors import InputError
from appliance.tls import certificate_names, read_certificate

__all__ = ["CertificatePart", "CertificateSource"]


@dataclass(frozen=True)
class CertificatePart:
    """The server certificate's validity (``not_after`` is ``None`` when there is none to watch)."""

    path: str = ""
    not_after: datetime | None = None
    names: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.path,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "names": self.names,
            "error": self.error,
        }


class CertificateSource:
    """Reads ``server.crt``; no path (recorded scenarios) or no file (a box without TLS yet) means nothing to watch."""

    name = "certificate"

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def read(self) -> CertificatePart:
        """When the certificate expires and whom it is for."""
        if self.path is None:
            return CertificatePart()
        if not self.path.exists():
            return CertificatePart(path=str(self.path))
        try:
            cert = read_certificate(self.path)
        except InputError as exc:
            return CertificatePart(path=str(self.path), error=f"the gateway's certificate: {exc.message}")
        names, ips = certificate_names(cert)
        return CertificatePart(path=str(self.path), not_after=cert.not_valid_after_utc, names=names + ips)
