"""``clinic-edge bundle build|verify``: the offline bundle (wheelhouse, model, sha256 manifest)."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from appliance.bundle import ARCHES, build_bundle, verify_bundle
from appliance.cli import EXIT_NEGATIVE, Outcome

__all__ = ["register"]

DEFAULT_CACHE = Path.home() / ".cache" / "clinic-edge" / "bundle"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``bundle build`` and ``bundle verify``."""
    parser = subparsers.add_parser(
        "bundle",
        help="build or verify the offline install bundle",
        description="An offline bundle holds every wheel (clinic-edge, ansible-core, vLLM and dependencies), the "
        "model and a sha256 manifest. Build it where there is internet; install with ./install.sh --bundle DIR.",
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    build = verbs.add_parser(
        "build",
        parents=[common],
        help="build a bundle into --out",
        description="Build a bundle. Examples:\n"
        "  clinic-edge bundle build --out /media/usb/bundle --profile gpu --arch aarch64 --model /srv/models/vlm\n"
        "  clinic-edge bundle build --out build/bundle --profile cpu --demo-model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--out", type=Path, required=True, help="the bundle folder (created or refreshed)")
    build.add_argument("--profile", choices=["cpu", "gpu"], default="gpu", help="vLLM build: gpu (default) or cpu")
    build.add_argument("--arch", choices=ARCHES, default=platform.machine(), help="target CPU (default: this one)")
    build.add_argument(
        "--python-version",
        default=f"{sys.version_info[0]}.{sys.version_info[1]}",
        help="target Python (3.12 on Ubuntu 24.04/DGX OS, 3.11 on Debian 12; default: this one)",
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="the model directory to include")
    source.add_argument("--demo-model", action="store_true", help="include the tiny demo model (rehearsals)")
    build.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"wheel cache (default {DEFAULT_CACHE})")
    build.set_defaults(func=_build)

    verify = verbs.add_parser(
        "verify",
        parents=[common],
        help="check a bundle against its manifest",
        description="Name every missing, extra or corrupt file. Exit 0 intact, 1 not. "
        "Example: clinic-edge bundle verify /media/usb/bundle",
    )
    verify.add_argument("directory", metavar="DIR", type=Path)
    verify.set_defaults(func=_verify)


def _build(args: argparse.Namespace) -> Outcome:
    built = build_bundle(
        args.out,
        profile=args.profile,
        arch=args.arch,
        py_version=args.python_version,
        cache=args.cache,
        model=args.model,
        demo_model=args.demo_model,
    )
    data = built.to_dict()
    return Outcome(
        data=data,
        text=f"Bundle ready in {built.path}: {data['files']} files, {data['bytes'] / 1024**3:.2f} GiB, "
        f"{data['profile']} profile for {data['arch']} / Python {data['python']}, model {data['model_name']}.\n"
        f"Install with: sudo ./install.sh --bundle {built.path}",
    )


def _verify(args: argparse.Namespace) -> Outcome:
    problems = verify_bundle(args.directory)
    lines = [f"{kind}: {rel}" for kind in ("missing", "extra", "corrupt") for rel in getattr(problems, kind)]
    lines.append(f"{args.directory}: " + ("intact" if problems.ok else "NOT intact (files above)"))
    return Outcome(data=problems.to_dict(), text="\n".join(lines), exit_code=0 if problems.ok else EXIT_NEGATIVE)
