"""``clinic-edge preflight``: the installer's checks, on their own (reads only, changes nothing)."""

from __future__ import annotations

import argparse

from appliance.cli import EXIT_NEGATIVE, Outcome
from appliance.preflight import add_arguments, check_lines, checks_from_args

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``preflight``."""
    parser = subparsers.add_parser(
        "preflight",
        parents=[common],
        help="check this box before an install (GPU, driver, memory, disk, ports, Secure Boot)",
        description="Run every check the installer makes before it changes anything; each failure says what to "
        "do. Exit 0 ready, 1 not. Example: clinic-edge preflight --model /srv/models/vlm --profile auto",
    )
    add_arguments(parser)
    parser.set_defaults(func=_preflight)


def _preflight(args: argparse.Namespace) -> Outcome:
    report = checks_from_args(args)
    lines = check_lines(report)
    lines.append(f"profile: {report.profile} — " + ("ready" if report.passed else "NOT ready"))
    return Outcome(data=report.to_dict(), text="\n".join(lines), exit_code=0 if report.passed else EXIT_NEGATIVE)
