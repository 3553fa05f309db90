"""``clinic-edge preflight``: the installer's checks, on their own (reads only, changes nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli import EXIT_NEGATIVE, Outcome
from appliance.preflight import PROFILES, run_checks

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
    parser.add_argument("--profile", default="auto", choices=PROFILES)
    parser.add_argument("--model", type=Path, required=True, help="model directory (config.json inside)")
    parser.add_argument("--model-name", help="its name in the model store (default: the directory's name)")
    parser.add_argument("--port", type=int, default=8443, help="the gateway's port (default 8443)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/clinic-edge"))
    parser.set_defaults(func=_preflight)


def _preflight(args: argparse.Namespace) -> Outcome:
    report = run_checks(args.profile, args.model, args.port, args.state_dir, model_name=args.model_name)
    lines = [
        f"{ {'ok': 'ok  ', 'warn': 'warn', 'fail': 'FAIL'}[c.status] } {c.name}: {c.detail}"
        + (f" → {c.remedy}" if c.remedy and c.status != "ok" else "")
        for c in report.checks
    ]
    lines.append(f"profile: {report.profile} — " + ("ready" if report.passed else "NOT ready"))
    return Outcome(data=report.to_dict(), text="\n".join(lines), exit_code=0 if report.passed else EXIT_NEGATIVE)
