"""The bottom bar above the key footer: the planner's summary (what fits, replicas × TP) and the refresh period."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from appliance.telemetry.parts import ConfigPart

__all__ = ["PlanBar"]


class PlanBar(Static):
    """``Plan: fits · 2 replicas × TP 1 · ctx 8192 · ...`` and the refresh period."""

    def show(self, config: ConfigPart, refresh: float) -> None:
        """Redraw from the config part."""
        text = Text.assemble(("Plan ", "bold"), config.plan_summary(), f"  ·  refresh {refresh:g} s")
        if config.error:
            text.append(f"  ·  {config.error}", style="yellow")
        self.update(text)
