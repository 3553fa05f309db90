"""``clinic-edge model install``: copy a model into the store, verified, read-only for the services."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import Outcome
from appliance.model_store import install_model

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``model install``."""
    parser = subparsers.add_parser("model", help="put a model into the model store")
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    install = verbs.add_parser(
        "install",
        parents=[common],
        help="copy and verify a model into STORE/NAME (no-op when already there)",
        description="Copy SRC into STORE/NAME, checking every file's sha256 against --manifest (a bundle's) when "
        "given. Safe to repeat: prints changed=false when nothing was copied. Example: clinic-edge model install "
        "/media/usb/bundle/model/vlm --name vlm --manifest /media/usb/bundle/manifest.json",
    )
    install.add_argument("source", metavar="SRC", type=Path)
    install.add_argument("--name", required=True, help="the name under the store (the served model name)")
    install.add_argument("--store", type=Path, default=Path("/var/lib/clinic-edge/models"))
    install.add_argument("--manifest", type=Path, help="a bundle manifest.json that lists the model's files")
    install.set_defaults(func=_install)


def _install(args: argparse.Namespace) -> Outcome:
    stored = install_model(args.source, args.store, args.name, args.manifest)
    verb = "Copied and verified" if stored.changed else "Already in place:"
    return Outcome(data=stored.to_dict(), text=f"{verb} {stored.path} ({stored.files} files). changed={stored.changed}")
