"""The help screen: what each key does and what the panels mean."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

__all__ = ["HelpScreen"]

HELP = """\
[b]clinic-edge dashboard[/b] — is the appliance healthy, fast, and how full is its memory?

[b]Keys[/b]
  t        run the quick self-test now (progress in the self-test panel; the result appears when done)
  j        the last 50 journal lines of the unit selected in the Services table (↑/↓ selects)
  r        refresh every panel now
  ?        this help            q   quit            escape   close this screen

[b]Panels[/b]
  Memory      each GPU's used/total and what vLLM holds; on unified memory (DGX Spark GB10) the host's
              MemTotal/MemAvailable, labelled "unified". N/A: the driver does not report that figure.
              vLLM replicas: KV-cache use, running and waiting requests (from /metrics).
  Self-test   the last result (TTFT p50/p99, TPOT, throughput, verdict), its age, TTFT over the history.
  Services    the systemd units (a unit that is down is red), the gateway's /readyz, vLLM's /health.

A source that cannot be read says why in its panel; the rest keeps working.
For scripts and monitoring: clinic-edge status --json (exit 1 when anything is unhealthy).
"""


class HelpScreen(ModalScreen[None]):
    """Keys and panels, explained."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        """The help text in a scrollable box."""
        with VerticalScroll(id="help-box"):
            yield Static(HELP, id="help-text")
