"""``clinic-edge bundle build|verify``: the offline bundle (wheelhouse, model, sha256 manifest, target box)."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.bundle import ARCHES, TARGET_OSES, build_bundle, verify_bundle
from appliance.cli import EXIT_NEGATIVE, Outcome

__all__ = ["register"]

DEFAULT_CACHE = Path.home() / ".cache" / "clinic-edge" / "bundle"


def _targets_help() -> str:
    rows = [
        f"  {t.key:<13} {t.boxes}: {' or '.join(t.arches)}, Python {t.python}, glibc {t.glibc[0]}.{t.glibc[1]}"
        for t in TARGET_OSES.values()
    ]
    return "\n".join(rows)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``bundle build`` and ``bundle verify``."""
    parser = subparsers.add_parser(
        "bundle",
        help="build or verify the offline install bundle",
        description="An offline bundle holds every wheel (clinic-edge, ansible-core, vLLM and dependencies), the "
        "model, a sha256 manifest and the box it is for. Build it where there is internet; install with "
        "./install.sh --bundle DIR, which refuses a bundle built for another box.",
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    build = verbs.add_parser(
        "build",
        parents=[common],
        help="build a bundle into --out for one target box",
        description="Build a bundle for one target box: its OS (which fixes glibc and Python) and CPU. The wheels "
        "are chosen for that box, not for the machine building it.\n\n"
        f"Targets (--os):\n{_targets_help()}\n\n"
        "Defaults: gpu -> dgx-os on aarch64, ubuntu-22.04 with --python-version 3.11, else ubuntu-24.04; "
        "cpu -> debian-12 (the rehearsal; built for this machine's CPU and Python).\n\n"
        "Examples:\n"
        "  clinic-edge bundle build --out /media/usb/bundle --profile gpu --os dgx-os --model /srv/models/vlm\n"
        "  clinic-edge bundle build --out /media/usb/bundle --profile gpu --os ubuntu-22.04 --model /srv/models/vlm\n"
        "  clinic-edge bundle build --out build/bundle --profile cpu --demo-model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--out", type=Path, required=True, help="the bundle folder (created or refreshed)")
    build.add_argument("--profile", choices=["cpu", "gpu"], default="gpu", help="vLLM build: gpu (default) or cpu")
    build.add_argument("--os", dest="os_key", choices=list(TARGET_OSES), help="the target box's OS (see above)")
    build.add_argument("--arch", choices=ARCHES, help="the target box's CPU (default: the OS's; cpu: this one)")
    build.add_argument(
        "--python-version",
        help="the target's Python; it follows --os (3.12 on Ubuntu 24.04/DGX OS, 3.11 on Ubuntu 22.04/Debian 12), "
        "so give it only to pick the default OS",
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
        os_key=args.os_key,
        arch=args.arch,
        py_version=args.python_version,
        cache=args.cache,
        model=args.model,
        demo_model=args.demo_model,
    )
    data = built.to_dict()
    target = data["target"]
    cuda = f", CUDA {target['cuda']} (NVIDIA driver {target['min_driver']}+)" if target["cuda"] else ""
    return Outcome(
        data=data,
        text=f"Bundle ready in {built.path}: {data['files']} files, {data['bytes'] / 1024**3:.2f} GiB, "
        f"{data['profile']} profile for {target['os_name']} {target['arch']} / Python {target['python']}{cuda}, "
        f"model {data['model_name']}.\nInstall with: sudo ./install.sh --bundle {built.path}",
    )


def _verify(args: argparse.Namespace) -> Outcome:
    problems = verify_bundle(args.directory)
    lines = [f"{kind}: {rel}" for kind in ("missing", "extra", "corrupt") for rel in getattr(problems, kind)]
    lines.append(f"{args.directory}: " + ("intact" if problems.ok else "NOT intact (files above)"))
    return Outcome(data=problems.to_dict(), text="\n".join(lines), exit_code=0 if problems.ok else EXIT_NEGATIVE)
