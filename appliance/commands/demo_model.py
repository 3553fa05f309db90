"""``clinic-edge demo-model build DIR``: the tiny random-weight vision-language model for tests and rehearsals."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import Outcome
from appliance.demo_model import build_demo_model

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``demo-model`` and its ``build`` verb."""
    parser = subparsers.add_parser(
        "demo-model",
        help="build the tiny demo vision-language model (tests, CPU rehearsal)",
        description="The demo model is a random-weight Idefics3 that vLLM serves on a CPU. It answers nonsense "
        "but exercises the whole path, inline images included.",
    )
    verbs = parser.add_subparsers(title="verbs", metavar="VERB", required=True)
    build = verbs.add_parser(
        "build",
        parents=[common],
        help="build it into DIR (offline, deterministic)",
        description="Build the demo model into DIR from a fixed seed: two builds are byte-identical. "
        "Needs the cpu extra (torch, transformers). Example: clinic-edge demo-model build /tmp/demo-vlm",
    )
    build.add_argument("directory", metavar="DIR", type=Path, help="where to write the model (new or empty)")
    build.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    build.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> Outcome:
    model = build_demo_model(args.directory, force=args.force)
    text = (
        f"Built {model.name} ({model.num_parameters:,} parameters) in {model.path}\n"
        f"Serve it with: clinic-edge vllm-cpu serve --model {model.path}"
    )
    return Outcome(data=model.to_dict(), text=text)
