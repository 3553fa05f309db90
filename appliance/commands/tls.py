"""``clinic-edge tls ensure`` (the clinic's CA and the gateway's certificate, idempotent) and ``tls renew``."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import Outcome
from appliance.tls import GATEWAY_RESTART, ensure_tls, renew_server

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``tls ensure`` and ``tls renew``."""
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
    renew = verbs.add_parser(
        "renew",
        parents=[common],
        help="re-issue the gateway's certificate from the same CA (workstations need no change)",
        description="Re-issue server.crt and server.key in DIR: a new key and a new validity (825 days, at most "
        "until the CA expires) for the same DNS names and IP addresses as the current certificate, signed by the "
        "same CA. ca.crt and ca.key are only read, so the workstations that trust ca.crt trust the new certificate "
        "too. Each file is written beside the old one and renamed over it, keeping its owner and mode. "
        "`clinic-edge status` warns 30 days before the certificate expires; renew then, or any time the server key "
        "may have leaked. The gateway reads its certificate only when it starts: restart it afterwards. To add or "
        "change a name or address, use `tls ensure` with every --name and --ip instead.",
        epilog=f"example: sudo clinic-edge tls renew --dir /etc/clinic-edge/tls && {GATEWAY_RESTART}",
    )
    renew.add_argument("--dir", type=Path, required=True, help="the folder with ca.crt, ca.key and server.crt")
    renew.set_defaults(func=_renew)


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


def _renew(args: argparse.Namespace) -> Outcome:
    files = renew_server(args.dir)
    covers = ", ".join(files.names + files.ips)
    text = "\n".join(
        [
            f"server certificate: {files.server_cert} renewed for {covers}",
            f"valid until:        {files.server_not_after} (the one it replaced: {files.replaced_not_after})",
            f"server key:         {files.server_key} (new)",
            f"CA kept:            {files.ca_cert} (SHA-256 {files.ca_sha256}); workstations need no change",
            f"next:               {GATEWAY_RESTART}   (the gateway serves the old certificate until then)",
        ]
    )
    return Outcome(data=files.to_dict(), text=text)
