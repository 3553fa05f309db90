"""The clinic-edge systemd units (``systemctl show``, one call for all) and their journals (``journalctl``).

Where systemd is not running (a container, a build machine) ``systemctl`` fails; the part then carries its own
words as the error and every other panel keeps working.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from appliance.telemetry.parts import UnitsPart, UnitStatus

__all__ = [
    "CommandResult",
    "JournalResult",
    "Runner",
    "SystemdSource",
    "clinic_edge_units",
    "parse_show",
    "run_command",
]

PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "StateChangeTimestamp", "NRestarts", "Result")


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of a command the sources ran."""

    returncode: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class JournalResult:
    """The last lines of a unit's journal, or why they could not be read."""

    unit: str
    lines: list[str]
    error: str | None = None


Runner = Callable[[Sequence[str]], CommandResult]


def run_command(argv: Sequence[str], timeout: float = 5.0) -> CommandResult:
    """Run ``argv`` with a timeout; a missing program or a timeout is a non-zero result, never an exception."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return CommandResult(127, "", f"{argv[0]} not found (is this a systemd machine?)")
    except subprocess.TimeoutExpired:
        return CommandResult(124, "", f"{argv[0]} did not answer within {timeout:.0f} s")
    return CommandResult(proc.returncode, proc.stdout, proc.stderr)


def clinic_edge_units(replicas: int) -> list[str]:
    """The units of an install with ``replicas`` vLLM replicas, in the order the panel shows them."""
    return [
        *(f"clinic-edge-vllm@{i}.service" for i in range(replicas)),
        "clinic-edge-gateway.service",
        "clinic-edge-selftest.timer",
        "clinic-edge-selftest.service",
    ]


def _timestamp(value: str) -> datetime | None:
    # With --timestamp=utc: "Mon 2026-11-23 00:10:01 UTC"; empty or "n/a" when never entered.
    parts = value.split()
    if len(parts) < 3:
        return None
    try:
        return datetime.strptime(f"{parts[1]} {parts[2]}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def parse_show(text: str) -> list[UnitStatus]:
    """Units from ``systemctl show -p ... UNIT...`` output (one block of KEY=VALUE per unit, blank-separated)."""
    units: list[UnitStatus] = []
    for block in text.strip().split("\n\n"):
        props: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key.strip()] = value.strip()
        if not props.get("Id"):
            continue
        restarts = props.get("NRestarts", "")
        units.append(
            UnitStatus(
                name=props["Id"],
                load_state=props.get("LoadState", "unknown"),
                active_state=props.get("ActiveState", "unknown"),
                sub_state=props.get("SubState", ""),
                since=_timestamp(props.get("StateChangeTimestamp", "")),
                restarts=int(restarts) if restarts.isdigit() else None,
                result=props.get("Result") or None,
            )
        )
    return units


def _first_line(result: CommandResult) -> str:
    text = (result.stderr or result.stdout).strip()
    return text.splitlines()[0] if text else f"exit status {result.returncode}"


class SystemdSource:
    """Reads the units with one ``systemctl show`` call; reads a journal on demand."""

    name = "units"

    def __init__(self, units: Sequence[str], run: Runner = run_command) -> None:
        self.units = list(units)
        self._run = run

    def read(self) -> UnitsPart:
        """Every unit's state, or the reason systemctl could not tell."""
        argv = ["systemctl", "show", "--timestamp=utc", "--no-pager", "-p", ",".join(PROPERTIES), *self.units]
        result = self._run(argv)
        if result.returncode != 0:
            return UnitsPart(error=f"systemctl: {_first_line(result)}")
        by_name = {u.name: u for u in parse_show(result.stdout)}
        return UnitsPart(units=[by_name.get(n, UnitStatus(name=n, load_state="not-found")) for n in self.units])

    def journal(self, unit: str, lines: int = 50) -> JournalResult:
        """The last ``lines`` lines of ``unit``'s journal."""
        result = self._run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "short-iso"])
        if result.returncode != 0:
            return JournalResult(unit, [], f"journalctl: {_first_line(result)}")
        found = [line for line in result.stdout.splitlines() if line.strip() and line.strip() != "-- No entries --"]
        if not found and result.stderr.strip():  # "No journal files were found." (no journald here)
            return JournalResult(unit, [], f"journalctl: {_first_line(result)}")
        return JournalResult(unit, found[-lines:])
