"""``clinic-edge tls ensure``: the clinic's CA and the gateway's server certificate (idempotent)."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import Outcome
from appliance.tls import ensure_tls

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``tls ensure``."""
    parser = subparsers.add_parser(
        "tls",
        help="make the clinic's CA and the gateway's TLS certificate",
        description="TLS for the gateway, from a local certificate authority that the workstations trust.",
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    ensure = verbs.add_parser(
        "ensure",
        parents=[common],
        help="create what is missing, keep what is valid",
        description="Create ca.crt/ca.key (the clinic CA, 10 years) and server.crt/server.key (the gateway, "
        "825 days, every --name and --ip) in DIR. Valid files are kept, so it is safe to run again; the server "
        "certificate is re-issued when it nears expiry or lacks a name or address. Private keys are mode 0600. "
        "Prints the CA's SHA-256 fingerprint: compare it on each workstation when importing ca.crt.",
        epilog="example: clinic-edge tls ensure --dir /etc/clinic-edge/tls --name dental-ai.clinic.lan "
        "--ip 192.168.1.20",
    )
    ensure.add_argument("--dir", type=Path, required=True, help="where the four files live")
    ensure.add_argument("--name", action="append", default=[], help="a DNS name workstations use for the box (repeat)")
    ensure.add_argument("--ip", action="append", default=[], help="an IP address workstations use (repeat)")
    ensure.set_defaults(func=_ensure)


def _ensure(args: argparse.Namespace) -> Outcome:
    files = ensure_tls(args.dir, args.name, args.ip)
    changed = ", ".join(files.created) if files.created else "nothing (all files valid)"
    text = "\n".join(
        [
            f"CA certificate:     {files.ca_cert}",
            f"CA key:             {files.ca_key}",
            f"server certificate: {files.server_cert} (valid until {files.server_not_after})",
            f"server key:         {files.server_key}",
            f"created:            {changed}",
            f"CA SHA-256 fingerprint: {files.ca_sha256}",
        ]
    )
    return Outcome(data=files.to_dict(), text=text)
