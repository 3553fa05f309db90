"""The top bar: identity (host, endpoint, model), the clock, and the health verdict in one glance."""

from __future__ import annotations

from datetime import datetime

from rich.console import Group
from rich.text import Text
from textual.widgets import Static

from appliance.telemetry.health import Problem
from appliance.telemetry.parts import ConfigPart

__all__ = ["TopBar"]


class TopBar(Static):
    """Line 1: clinic-edge · host · endpoint · model · clock. Line 2: HEALTHY, or the problems in red."""

    def __init__(self, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.config: ConfigPart | None = None
        self.now: datetime | None = None
        self.problems: list[Problem] | None = None

    def show(
        self, config: ConfigPart | None = None, now: datetime | None = None, problems: list[Problem] | None = None
    ) -> None:
        """Redraw with whatever changed."""
        self.config = config or self.config
        self.now = now or self.now
        self.problems = problems if problems is not None else self.problems
        self.update(self._render_bar())

    def _render_bar(self) -> Group:
        cfg = self.config
        host = cfg.hostname if cfg else "…"
        endpoint = (cfg.endpoint if cfg else None) or "endpoint unknown"
        model = (cfg.model if cfg else None) or "model unknown"
        clock = self.now.strftime("%Y-%m-%d %H:%M:%S %Z") if self.now else ""
        ident = Text.assemble(("clinic-edge ", "bold"), (host, "bold cyan"), f" · {endpoint} · model {model}")
        ident.append(" " * max(1, (self.size.width or 120) - len(ident.plain) - len(clock) - 1))
        ident.append(clock, style="bold")
        if self.problems is None:
            health = Text(" checking… ", style="dim")
        else:
            bad = [p for p in self.problems if p.severity == "bad"]
            warn = [p for p in self.problems if p.severity == "warn"]
            if bad:
                health = Text.assemble(
                    (f" ✖ UNHEALTHY ({len(bad)}) ", "bold white on red"), " ", (bad[0].text, "bold red")
                )
                if len(bad) > 1:
                    health.append(f"  (+{len(bad) - 1} more)", style="red")
            elif warn:
                health = Text.assemble((" ▲ HEALTHY, WITH WARNINGS ", "bold black on yellow"), " ", warn[0].text)
            else:
                health = Text(" ✔ HEALTHY ", style="bold black on green")
        health.truncate(max(20, (self.size.width or 120)), overflow="ellipsis")
        return Group(ident, health)
