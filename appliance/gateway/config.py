"""The gateway's settings: one dataclass, filled from ``gateway.yml`` and then from command-line flags.

The YAML keys mirror the flags (``listen``, ``upstreams``, ``keys_file``, ``tls_cert``, ``tls_key``, ``audit_log``,
``max_tokens_cap`` and the limits below); a flag given on the command line wins over the file.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from appliance.errors import InputError, UsageError

__all__ = ["GatewayConfig", "check_config", "load_config_file"]


@dataclass
class GatewayConfig:
    """Everything the gateway needs; defaults suit one clinic box."""

    upstreams: list[str] = field(default_factory=list)
    listen: str = "127.0.0.1:8443"
    keys_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    audit_log: Path | None = None
    upstream_api_key: str | None = None
    # Request limits, all checked before anything is decoded in full.
    max_body_bytes: int = 32 * 1024 * 1024
    max_images: int = 4
    max_image_bytes: int = 12 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_tokens_cap: int = 2048
    # Admission control.
    max_inflight: int = 64
    max_per_key: int = 16
    queue_timeout_s: float = 5.0
    max_queue: int = 256
    # Upstream behaviour.
    connect_timeout_s: float = 3.0
    # Idle connections to vLLM are kept this long (vLLM must keep them longer: VLLM_HTTP_TIMEOUT_KEEP_ALIVE=75 in
    # its unit). One closed by vLLM earlier is noticed when it closes, or retried on a fresh connection.
    upstream_keepalive_s: float = 60.0
    first_byte_timeout_s: float = 600.0  # long prefills with big images: no short total timeout
    stall_timeout_s: float = 120.0  # a started stream with no byte from vLLM for this long has hung: end it
    health_interval_s: float = 2.0
    probe_interval_s: float = 30.0  # a 1-token generation when no real one succeeded for this long
    ready_window_s: float = 120.0  # a generation older than this no longer proves readiness
    retry_after_s: int = 5

    @property
    def host(self) -> str:
        """The host part of ``listen`` (brackets removed for IPv6)."""
        host, _, _ = self.listen.rpartition(":")
        return host.strip("[]")

    @property
    def port(self) -> int:
        """The port part of ``listen``."""
        return int(self.listen.rpartition(":")[2])


_PATH_KEYS = {"keys_file", "tls_cert", "tls_key", "audit_log"}
_FLOAT_KEYS = {"queue_timeout_s", "connect_timeout_s", "upstream_keepalive_s", "first_byte_timeout_s",
               "stall_timeout_s", "health_interval_s", "probe_interval_s", "ready_window_s"}  # fmt: skip


def load_config_file(path: Path) -> dict[str, Any]:
    """Read ``gateway.yml`` into a dict of known keys (typed); unknown keys are an error, so typos show."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as err:
        raise InputError(f"Cannot read the gateway config {path}: {err.strerror}.", "Check --config.") from err
    except yaml.YAMLError as err:
        raise InputError(f"The gateway config {path} is not valid YAML: {err}.", "Fix the file and retry.") from err
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"The gateway config {path} must be a mapping of settings.", "See docs/workstation.md.")
    known = {f.name: f for f in fields(GatewayConfig)}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise InputError(
                f"Unknown setting '{key}' in {path}.",
                f"Known settings: {', '.join(sorted(known))}.",
            )
        if value is None:
            continue
        try:
            if key == "upstreams":
                out[key] = [str(v) for v in (value if isinstance(value, list) else [value])]
            elif key in _PATH_KEYS:
                out[key] = Path(str(value))
            elif key in _FLOAT_KEYS:
                out[key] = float(value)
            elif key in ("listen", "upstream_api_key"):
                out[key] = str(value)
            else:
                out[key] = int(value)
        except (TypeError, ValueError) as err:
            raise InputError(f"Setting '{key}' in {path} has a bad value: {value!r}.", "Fix the file.") from err
    return out


def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UsageError(f"Cannot resolve '{host}': {err.strerror}.", "Use an IP address.") from err
    return [ipaddress.ip_address(info[4][0]) for info in infos]


def check_config(cfg: GatewayConfig) -> None:
    """Refuse settings that would leak data or cannot work, with a clear remedy."""
    if not cfg.upstreams:
        raise UsageError("No upstream vLLM given.", "Pass --upstream http://127.0.0.1:8000 (repeat for replicas).")
    if cfg.keys_file is None:
        raise UsageError("No keys file given.", "Pass --keys-file /etc/clinic-edge/keys.json.")
    for url in cfg.upstreams:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise UsageError(
                f"Upstream '{url}' is not a base URL like http://127.0.0.1:8000.",
                "Give the scheme, host and port only (no /v1).",
            )
        for addr in _addresses(parts.hostname):
            if not (addr.is_loopback or addr.is_private) or addr.is_link_local or addr.is_unspecified:
                raise UsageError(
                    f"Upstream '{url}' resolves to {addr}, which is not a loopback or private LAN address.",
                    "The gateway only forwards to vLLM on this box or its private network; patient data must not "
                    "leave it. Point --upstream at 127.0.0.1 (or another private address).",
                )
    try:
        host, port = cfg.host, cfg.port
        listen_addrs = _addresses(host)
    except ValueError as err:
        raise UsageError(f"--listen '{cfg.listen}' is not HOST:PORT.", "E.g. --listen 0.0.0.0:8443.") from err
    if not 0 < port < 65536:
        raise UsageError(f"--listen port {port} is out of range.", "E.g. --listen 0.0.0.0:8443.")
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise UsageError("Give both --tls-cert and --tls-key, or neither.", "They come from 'clinic-edge tls ensure'.")
    if cfg.tls_cert is None and not all(a.is_loopback for a in listen_addrs):
        raise UsageError(
            f"Refusing plain HTTP on {cfg.listen}: it is not a loopback address.",
            "Workstation traffic carries patient images: pass --tls-cert and --tls-key (clinic-edge tls ensure "
            "makes them), or listen on 127.0.0.1 for local tests.",
        )
    for p in (cfg.tls_cert, cfg.tls_key):
        if p is not None and not p.is_file():
            raise InputError(f"TLS file {p} does not exist.", "Run 'clinic-edge tls ensure --dir DIR --name NAME'.")
    for name in ("max_body_bytes", "max_images", "max_image_bytes", "max_image_pixels", "max_tokens_cap",
                 "max_inflight", "max_per_key", "first_byte_timeout_s", "stall_timeout_s"):  # fmt: skip
        if getattr(cfg, name) <= 0:
            raise UsageError(f"Setting {name} must be positive.", "Fix the config file or the flag.")
