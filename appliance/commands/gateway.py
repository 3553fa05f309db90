"""``clinic-edge gateway``: run the LAN gateway in front of vLLM (TLS, workstation keys, inline images only)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from appliance.cli import Outcome
from appliance.errors import UsageError
from appliance.gateway.config import GatewayConfig, check_config, load_config_file

__all__ = ["build_config", "register"]

_EXPLICIT = {"upstreams", "listen", "keys_file", "tls_cert", "tls_key", "audit_log", "upstream_api_key"}
_HELP = {
    "max_body_bytes": "largest request body accepted",
    "max_images": "images per request",
    "max_image_bytes": "decoded bytes per image",
    "max_image_pixels": "pixels per image (read from the image header)",
    "max_tokens_cap": "max_tokens is capped at this",
    "max_inflight": "requests in flight in total",
    "max_per_key": "requests in flight per workstation key",
    "queue_timeout_s": "seconds a request may wait for a slot before 429",
    "max_queue": "requests that may wait for a slot",
    "connect_timeout_s": "seconds to connect to vLLM",
    "upstream_keepalive_s": "seconds an idle connection to vLLM is kept for the next request",
    "first_byte_timeout_s": "longest silence from vLLM (long prefills!) before 504",
    "stall_timeout_s": "longest silence from vLLM in the middle of a stream before it is ended with an error event",
    "health_interval_s": "seconds between upstream health checks",
    "probe_interval_s": "send a 1-token probe when no generation succeeded for this long",
    "ready_window_s": "a generation older than this no longer proves readiness",
    "retry_after_s": "Retry-After seconds on 429 and 503",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``gateway``."""
    parser = subparsers.add_parser(
        "gateway",
        help="run the LAN gateway in front of vLLM",
        description="Serve POST /v1/chat/completions and GET /v1/models to the clinic's workstations (with a key), "
        "plus /healthz, /readyz and /metrics, in front of one or more vLLM replicas on loopback or the private "
        "network. Images must be inline (data:image/png|jpeg|webp;base64); nothing else of vLLM is reachable. "
        "Settings come from --config (YAML, keys named like the flags with underscores); flags override it.",
        epilog="examples:\n"
        "  clinic-edge gateway --config /etc/clinic-edge/gateway.yml\n"
        "  clinic-edge gateway --upstream http://127.0.0.1:8000 --listen 0.0.0.0:8443 \\\n"
        "      --keys-file /etc/clinic-edge/keys.json \\\n"
        "      --tls-cert /etc/clinic-edge/tls/server.crt --tls-key /etc/clinic-edge/tls/server.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="gateway.yml with the same settings as the flags")
    parser.add_argument("--upstream", action="append", dest="upstreams", help="a vLLM base URL (repeat for replicas)")
    parser.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8443)")
    parser.add_argument("--keys-file", type=Path, help="workstation keys (clinic-edge keys add)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (clinic-edge tls ensure)")
    parser.add_argument("--tls-key", type=Path, help="its private key")
    parser.add_argument("--audit-log", type=Path, help="JSON-lines audit log (default: standard error)")
    parser.add_argument("--upstream-api-key", help="the key vLLM was started with (--api-key), if any")
    for f in fields(GatewayConfig):
        if f.name in _EXPLICIT:
            continue
        kind = float if f.name.endswith("_s") and f.name != "retry_after_s" else int
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            dest=f.name,
            help=f"{_HELP.get(f.name, '')} (default {f.default})",
        )
    parser.set_defaults(func=_run)


def build_config(args: argparse.Namespace) -> GatewayConfig:
    """The configuration from ``--config`` and the flags (flags win), checked."""
    values: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for f in fields(GatewayConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    cfg = GatewayConfig(**values)
    check_config(cfg)
    return cfg


def _run(args: argparse.Namespace) -> Outcome:
    if getattr(args, "json", False):
        raise UsageError("'gateway' runs a server and has no --json output.", "Drop --json.")
    cfg = build_config(args)
    from appliance.gateway.server import run

    run(cfg)
    return Outcome(data={}, text="clinic-edge gateway: stopped.")
