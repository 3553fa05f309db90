"""The ``clinic-edge`` command line: one entry point, one subcommand per concern.

Conventions every subcommand follows (documented in ``clinic-edge --help`` and the README):

* ``--json`` prints exactly one JSON document on standard output and nothing else there; progress and logs go to
  standard error, so ``clinic-edge plan MODEL --json | jq`` always works.
* Exit codes: 0 success; 1 the command ran but its verdict is negative (does not fit, self-test failed, something
  unhealthy); 2 it could not do its job (bad input, contradictory flags, a service unreachable or not ready, a tool
  that failed); 130 interrupted (Ctrl-C, SIGINT), 143 stopped by SIGTERM, 129 by SIGHUP (128 + the signal's number,
  as a shell reports a process the signal killed) — in each case only after every process the command started has
  been stopped (:mod:`appliance.processes`).
* Errors are one paragraph saying what was wrong and what to do, never a traceback. With ``--json`` they are
  ``{"error": {"kind", "message", "remedy", "details"}}``.

A subcommand lives in ``appliance/commands/<name>.py`` and exposes ``register(subparsers, common)``; it sets
``func`` on its parser to a callable taking the parsed arguments and returning an :class:`Outcome`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from appliance import __version__
from appliance.errors import ClinicEdgeError
from appliance.processes import Interrupted

__all__ = [
    "EXIT_ERROR",
    "EXIT_HANGUP",
    "EXIT_INTERRUPTED",
    "EXIT_NEGATIVE",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "Outcome",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_ERROR = 2
EXIT_HANGUP = 129  # SIGHUP: the terminal or SSH session went away
EXIT_INTERRUPTED = 130  # SIGINT: Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM: kill PID, systemctl stop, a process manager

# Each module registers one subcommand (or a group of them). Order here is the order in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "appliance.commands.demo_model",
    "appliance.commands.vllm_cpu",
    "appliance.commands.preflight",
    "appliance.commands.model",
    "appliance.commands.bundle",
    "appliance.commands.plan",
    "appliance.commands.vllm_gate",
    "appliance.commands.tls",
    "appliance.commands.keys",
    "appliance.commands.gateway",
    "appliance.commands.selftest",
    "appliance.commands.status",
    "appliance.commands.dashboard",
)


@dataclass
class Outcome:
    """What a subcommand produced: ``data`` for ``--json``, ``text`` for people, and the exit code."""

    data: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    exit_code: int = EXIT_OK


Handler = Callable[[argparse.Namespace], Outcome]

EPILOG = """\
conventions:
  --json      one JSON document on stdout (progress goes to stderr)
  exit codes  0 ok · 1 negative verdict (does not fit, self-test failed, unhealthy)
              2 could not run (bad input, unreachable service, failed tool)
              130 Ctrl-C · 143 SIGTERM · 129 SIGHUP (after stopping what it started)

Run 'clinic-edge COMMAND --help' for a command's options and examples.
"""


def _common_parent() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="clinic-edge",
        description="Run and check a clinic's private AI radiograph-reading appliance.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"clinic-edge {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    common = _common_parent()
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers, common)
    return parser


def _emit(outcome: Outcome, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(outcome.data, indent=2, sort_keys=True, default=str) + "\n")
    elif outcome.text:
        out.write(outcome.text if outcome.text.endswith("\n") else outcome.text + "\n")


def _emit_error(err: ClinicEdgeError, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps({"error": err.to_dict()}, indent=2, sort_keys=True, default=str) + "\n")
        return
    lines = [f"clinic-edge: error: {err.message}"]
    if err.remedy:
        lines.append(f"what to do: {err.remedy}")
    tail = err.details.get("output_tail")
    if isinstance(tail, str) and tail.strip():
        lines.append("last lines of its output:\n" + tail.rstrip())
    sys.stderr.write("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, print its outcome and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "func", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    as_json = bool(getattr(args, "json", False))
    try:
        outcome = handler(args)
    except ClinicEdgeError as err:
        _emit_error(err, as_json)
        return err.exit_code
    except Interrupted as stop:  # a signal while it ran processes; appliance.processes has stopped them
        sys.stderr.write(f"clinic-edge: stopped by {signal.Signals(stop.signum).name}\n")
        return stop.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("clinic-edge: interrupted\n")
        return EXIT_INTERRUPTED
    _emit(outcome, as_json, sys.stdout)
    return outcome.exit_code
