"""``clinic-edge dashboard``: the technician's live view (Textual) — memory, self-test, services."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from appliance.cli import Outcome
from appliance.commands.telemetry_flags import (
    add_telemetry_flags,
    options_from_args,
    selftest_max_age,
    sources_from_args,
)
from appliance.errors import UsageError
from appliance.telemetry.selftest_files import results_dir

__all__ = ["register", "selftest_argv"]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``dashboard``."""
    parser = subparsers.add_parser(
        "dashboard",
        help="live view of memory, self-test results and services (keys: t self-test, j journal, ? help, q quit)",
        description="A terminal dashboard for the technician (works over SSH): GPU or unified memory and what vLLM "
        "holds, KV-cache use and queued requests, the last self-test and its TTFT history, each systemd unit, the "
        "gateway's readiness. Refreshes every 2 s. Example: clinic-edge dashboard --refresh 5",
    )
    add_telemetry_flags(parser)
    parser.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS", help="refresh period (default 2)")
    parser.add_argument(
        "--selftest-target",
        metavar="URL",
        help="what the t key's quick self-test measures (default: the first vLLM replica)",
    )
    parser.add_argument(
        "--selftest-command",
        metavar="CMD",
        default=f"{shlex.quote(sys.executable)} -m appliance selftest",
        help="the self-test program (default: this clinic-edge's 'selftest')",
    )
    parser.set_defaults(func=_dashboard)


def selftest_argv(command: list[str], target: str, state_dir: Path, ca_cert: Path | None) -> list[str]:
    """The quick self-test's command line; results go where the nightly runs and the dashboard read them."""
    argv = [*command, "--quick", "--json", "--target", target, "--state-dir", str(results_dir(state_dir))]
    if ca_cert is not None and target.startswith("https:"):
        argv += ["--ca-cert", str(ca_cert)]
    return argv


def _dashboard(args: argparse.Namespace) -> Outcome:
    if args.refresh < 0.2:
        raise UsageError(f"--refresh {args.refresh} is too fast.", "Use 0.2 seconds or more (the default is 2).")
    options = options_from_args(args)
    sources = sources_from_args(args)
    target = args.selftest_target or options.resolved_vllm_urls()[0]
    argv = selftest_argv(shlex.split(args.selftest_command), target, options.state_dir, options.resolved_ca_cert())

    from tui.app import DashboardApp, DashboardSettings  # Textual loads only for this command

    settings = DashboardSettings(
        sources=sources, refresh=args.refresh, selftest_argv=argv, selftest_max_age=selftest_max_age(args)
    )
    DashboardApp(settings).run()
    return Outcome(text="")
