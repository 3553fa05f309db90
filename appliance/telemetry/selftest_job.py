"""Run ``clinic-edge selftest --quick --json`` as a child process, reporting its progress lines as they come."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["SelftestJob", "SelftestOutcome"]

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
    """One self-test child process; :meth:`cancel` ends it (on quit)."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.argv = list(argv)
        self._proc: subprocess.Popen[str] | None = None

    def run(self, on_progress: Callable[[str], None]) -> SelftestOutcome:
        """Run to completion, calling ``on_progress`` with each line the self-test writes to stderr."""
        last = ""
        with tempfile.TemporaryFile(mode="w+") as out:
            try:
                self._proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.PIPE, text=True)
            except OSError as exc:
                return SelftestOutcome(127, f"self-test could not start: {exc}", False)
            with self._proc as proc:
                assert proc.stderr is not None
                for line in proc.stderr:
                    if line.strip():
                        last = line.strip()
                        on_progress(last)
                returncode = proc.wait()
            out.seek(0)
            return SelftestOutcome.from_output(returncode, out.read(), last)

    def cancel(self) -> None:
        """Terminate the child if it is still running."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
