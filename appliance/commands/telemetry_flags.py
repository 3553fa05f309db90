"""The flags ``clinic-edge dashboard`` and ``clinic-edge status`` share: where every data source lives."""

from __future__ import annotations

import argparse
import tempfile
from datetime import timedelta
from pathlib import Path

from appliance.errors import InputError, UsageError
from appliance.telemetry.replay import load_scenario, replay_sources
from appliance.telemetry.sources import Sources, TelemetryOptions, live_sources

__all__ = ["add_telemetry_flags", "options_from_args", "selftest_max_age", "sources_from_args"]


def add_telemetry_flags(parser: argparse.ArgumentParser) -> None:
    """Add --etc-dir, --state-dir, --gateway, --vllm, --ca-cert, --timeout, --selftest-max-age, --replay."""
    group = parser.add_argument_group("data sources (defaults: the installed appliance)")
    group.add_argument(
        "--etc-dir", type=Path, default=Path("/etc/clinic-edge"), help="config folder (default %(default)s)"
    )
    group.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/clinic-edge"),
        help="state folder with selftest/ (default %(default)s)",
    )
    group.add_argument(
        "--gateway", metavar="URL", default="https://127.0.0.1:8443", help="gateway base URL (default %(default)s)"
    )
    group.add_argument(
        "--vllm",
        metavar="URL",
        action="append",
        help="a vLLM replica's base URL; repeat for each (default: the plan's replicas on 127.0.0.1:8000+i)",
    )
    group.add_argument("--ca-cert", type=Path, help="CA that signed the gateway's certificate (default ETC/tls/ca.crt)")
    group.add_argument("--timeout", type=float, default=1.5, help="seconds per HTTP request (default %(default)s)")
    group.add_argument(
        "--selftest-max-age",
        type=float,
        default=26.0,
        metavar="HOURS",
        help="warn when the last self-test is older than this (default %(default)s: nightly timer plus slack)",
    )
    group.add_argument("--replay", type=Path, metavar="FILE", help="show a recorded scenario instead of this machine")


def options_from_args(args: argparse.Namespace) -> TelemetryOptions:
    """Validated options from the parsed flags."""
    if args.timeout <= 0 or args.selftest_max_age <= 0:
        raise UsageError("--timeout and --selftest-max-age must be positive.", "Give a number of seconds / hours > 0.")
    for url in [args.gateway, *(args.vllm or [])]:
        if url and not url.startswith(("http://", "https://")):
            raise UsageError(f"{url!r} is not an http(s) URL.", "Give a base URL such as http://127.0.0.1:8000.")
    if args.ca_cert is not None and not args.ca_cert.is_file():
        raise InputError(f"--ca-cert {args.ca_cert} is not a file.", "Point it at the appliance's ca.crt.")
    return TelemetryOptions(
        etc_dir=args.etc_dir,
        state_dir=args.state_dir,
        gateway_url=args.gateway or None,
        vllm_urls=args.vllm,
        ca_cert=args.ca_cert,
        timeout=args.timeout,
    )


def selftest_max_age(args: argparse.Namespace) -> timedelta:
    """``--selftest-max-age`` as a timedelta."""
    return timedelta(hours=args.selftest_max_age)


def sources_from_args(args: argparse.Namespace) -> Sources:
    """Live sources, or the recorded scenario given with ``--replay``."""
    options = options_from_args(args)
    if args.replay is None:
        return live_sources(options)
    try:
        scenario = load_scenario(args.replay)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the scenario {args.replay}: {exc}", "Give a scenario JSON file.") from exc
    return replay_sources(scenario, Path(tempfile.mkdtemp(prefix="clinic-edge-replay-")))
