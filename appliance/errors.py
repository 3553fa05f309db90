"""The exception tree every clinic-edge command raises for problems a person can fix.

Each error carries *what went wrong* and *what to do about it*. The CLI prints both (or emits them as JSON with
``--json``) and exits with the error's exit code; it never shows a traceback for these.

    ClinicEdgeError            exit 2 unless overridden
    ├── UsageError             contradictory or invalid flags
    ├── InputError             a file or value given to us is missing, unreadable or malformed
    ├── UnreachableError       a service we must talk to is down or not ready
    └── ExternalToolError      a program we run (vLLM, ansible-playbook, systemctl...) failed
"""

from __future__ import annotations

__all__ = [
    "ClinicEdgeError",
    "ExternalToolError",
    "InputError",
    "UnreachableError",
    "UsageError",
]


class ClinicEdgeError(Exception):
    """A problem with a message for a person and a remedy they can act on."""

    exit_code = 2
    kind = "error"

    def __init__(self, message: str, remedy: str = "", *, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.remedy = remedy
        self.details = details or {}

    def to_dict(self) -> dict[str, object]:
        """The error as the ``error`` member of a command's ``--json`` output."""
        out: dict[str, object] = {"kind": self.kind, "message": self.message}
        if self.remedy:
            out["remedy"] = self.remedy
        if self.details:
            out["details"] = self.details
        return out


class UsageError(ClinicEdgeError):
    """Flags that contradict each other or a value out of range."""

    kind = "usage"


class InputError(ClinicEdgeError):
    """A file or value we were given is missing, unreadable or malformed."""

    kind = "input"


class UnreachableError(ClinicEdgeError):
    """A service we must talk to is down or not ready yet."""

    kind = "unreachable"


class ExternalToolError(ClinicEdgeError):
    """A program we run failed; ``details`` carries the tail of its own error text."""

    kind = "external"
