"""The self-test panel: the latest result, its age (with a warning when stale), and TTFT over the history."""

from __future__ import annotations

from datetime import datetime, timedelta

from rich.console import Group, RenderableType
from rich.text import Text
from textual.widgets import Static

from appliance.telemetry.health import age_text
from appliance.telemetry.parts import SelftestPart
from tui.widgets.bars import na
from tui.widgets.ttft_plot import plot_ttft

__all__ = ["SelftestPanel", "render_selftest"]


def render_selftest(part: SelftestPart | None, now: datetime, max_age: timedelta) -> RenderableType:
    """The panel's content for ``part`` at time ``now``."""
    if part is None:
        return Text("reading…", style="dim")
    if part.error:
        return Text(f"⚠ {part.error}", style="bold red")
    run = part.latest
    if run is None:
        return Group(
            Text("No self-test yet", style="bold yellow"),
            Text(f"nothing in {part.directory}; press t to run the quick self-test", style="dim"),
        )
    if run.passed is None:
        verdict = Text(" UNKNOWN ", style="bold black on yellow")
    else:
        verdict = (
            Text(" PASSED ", style="bold black on green") if run.passed else Text(" FAILED ", style="bold white on red")
        )
    when = run.when
    age = now - when if when else None
    head = Text.assemble(
        verdict, f"  {run.mode or 'self-test'}", f" · {age_text(age)} ago" if age is not None else " · time unknown"
    )
    lines: list[RenderableType] = [head]
    if run.reason:
        lines.append(Text(run.reason, style="red" if run.passed is False else ""))
    lines.append(
        Text(
            f"TTFT p50 {na(run.ttft_p50_ms, '{:.0f} ms')}  p99 {na(run.ttft_p99_ms, '{:.0f} ms')}   "
            f"TPOT {na(run.tpot_p50_ms, '{:.1f} ms')}"
        )
    )
    lines.append(
        Text(
            f"throughput {na(run.request_throughput, '{:.2f}')} req/s · {na(run.output_throughput, '{:.0f}')} tok/s"
            f" · {na(run.completed)} ok / {na(run.failed)} failed"
        )
    )
    if age is not None and age > max_age:
        lines.append(
            Text(f"⚠ last run is {age_text(age)} old (expected within {age_text(max_age)})", style="bold yellow")
        )
    lines.append(Text(""))
    lines.append(Text("TTFT over the history", style="bold"))
    lines.append(plot_ttft([r.ttft_p50_ms for r in part.history], [r.ttft_p99_ms for r in part.history]))
    return Group(*lines)


class SelftestPanel(Static):
    """Latest self-test, staleness, TTFT history; while a run is in progress, its progress."""

    def __init__(self, max_age: timedelta, id: str | None = None) -> None:
        super().__init__(Text("reading…", style="dim"), id=id)
        self.border_title = "Self-test"
        self.max_age = max_age
        self.part: SelftestPart | None = None
        self.now: datetime | None = None
        self.progress: str | None = None

    def show(self, part: SelftestPart | None, now: datetime) -> None:
        """Redraw with ``part`` (``None``: keep the last one) as of ``now``."""
        self.part = part or self.part
        self.now = now
        self._redraw()

    def set_progress(self, progress: str | None) -> None:
        """Show (or clear, with ``None``) the progress line of a running self-test."""
        self.progress = progress
        self._redraw()

    def _redraw(self) -> None:
        body = render_selftest(self.part, self.now or datetime.now().astimezone(), self.max_age)
        if self.progress is not None:
            body = Group(Text(f"▶ {self.progress}", style="bold cyan"), body)
        self.update(body)
