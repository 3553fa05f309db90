"""Run ``clinic-edge selftest --quick --json`` as a child process, reporting its progress lines as they come."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from appliance.processes import ManagedProcess

__all__ = ["SelftestJob", "SelftestOutcome"]

# The self-test is a client: on SIGTERM it has only its connections to drop.
CANCEL_GRACE_S = 5.0
EXIT_MEANING = {0: "passed", 1: "failed", 2: "could not run (target unreachable or not ready)"}


@dataclass(frozen=True)
class SelftestOutcome:
    """How the run ended: exit code, one line for people, and the JSON document when there was one."""

    returncode: int
    summary: str
    passed: bool

    @classmethod
    def from_output(cls, returncode: int, stdout: str, last_progress: str) -> SelftestOutcome:
        """Build the outcome from the exit code and the ``--json`` document (or the error document)."""
        reason = ""
        try:
            doc = json.loads(stdout) if stdout.strip() else None
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            verdict, error = doc.get("verdict"), doc.get("error")
            if isinstance(verdict, dict):
                reason = str(verdict.get("reason") or "")
            elif isinstance(error, dict):
                reason = str(error.get("message") or "")
        meaning = EXIT_MEANING.get(returncode, f"ended with exit code {returncode}")
        detail = reason or last_progress
        return cls(returncode, f"self-test {meaning}" + (f": {detail}" if detail else ""), returncode == 0)


class SelftestJob:
    """One self-test child process; :meth:`cancel` ends it and anything it started (on quit).

    Run it from a worker thread that waits for it, as the dashboard does: the child is told to stop (SIGTERM) if that
    thread dies, so a dashboard killed outright does not leave a self-test running.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._proc: ManagedProcess | None = None

    def run(self, on_progress: Callable[[str], None]) -> SelftestOutcome:
        """Run to completion, calling ``on_progress`` with each line the self-test writes to stderr."""
        last = ""
        with tempfile.TemporaryFile(mode="w+") as out:
            proc = ManagedProcess(
                self.argv, name="self-test", stdout=out, stderr=subprocess.PIPE, text=True, grace=CANCEL_GRACE_S
            )
            try:
                popen = proc.start()
            except OSError as exc:
                return SelftestOutcome(127, f"self-test could not start: {exc}", False)
            self._proc = proc
            try:
                with popen:
                    assert popen.stderr is not None
                    for line in popen.stderr:
                        if line.strip():
                            last = line.strip()
                            on_progress(last)
                    returncode = popen.wait()
            finally:
                proc.stop()  # whatever it started, and the child itself if reading its output failed
            out.seek(0)
            return SelftestOutcome.from_output(returncode, out.read(), last)

    def cancel(self) -> None:
        """Stop the self-test and everything it started (SIGTERM, then SIGKILL after a few seconds)."""
        if self._proc is not None:
            self._proc.stop()
