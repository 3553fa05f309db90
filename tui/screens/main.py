"""The main screen: three panels refreshed by one worker per data source, and the actions."""

from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer

from appliance.telemetry.health import problems
from appliance.telemetry.parts import ConfigPart, GatewayPart, MemoryPart, SelftestPart, UnitsPart, VllmPart
from appliance.telemetry.selftest_job import SelftestJob, SelftestOutcome
from appliance.telemetry.sources import PART_NAMES, Snapshot, Source, read_part
from tui.screens.journal import JournalScreen
from tui.widgets.memory_panel import MemoryPanel
from tui.widgets.plan_bar import PlanBar
from tui.widgets.selftest_panel import SelftestPanel
from tui.widgets.services_panel import ServicesPanel
from tui.widgets.top_bar import TopBar

if TYPE_CHECKING:
    from tui.app import DashboardSettings

__all__ = ["MainScreen"]

REDRAW_AGES_S = 30.0


class MainScreen(Screen[None]):
    """Memory, self-test and services; every source read in its own thread worker."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("t", "run_selftest", "quick self-test"),
        Binding("j", "journal", "journal"),
        Binding("r", "refresh", "refresh"),
    ]

    class PartRead(Message):
        """A source answered."""

        def __init__(self, name: str, part: Any, taken_at: datetime) -> None:
            super().__init__()
            self.name = name
            self.part = part
            self.taken_at = taken_at

    class SelftestProgress(Message):
        """The running self-test wrote a progress line."""

        def __init__(self, line: str) -> None:
            super().__init__()
            self.line = line

    class SelftestFinished(Message):
        """The self-test ended."""

        def __init__(self, outcome: SelftestOutcome) -> None:
            super().__init__()
            self.outcome = outcome

    def __init__(self, settings: DashboardSettings) -> None:
        super().__init__()
        self.settings = settings
        self.parts: dict[str, Any] = {}
        self.now: datetime = settings.sources.clock()
        self._in_flight: set[str] = set()
        self._drawn_at: dict[str, datetime] = {}
        self.selftest_job: SelftestJob | None = None
        self.selftest_outcome: SelftestOutcome | None = None
        self._selftest_started = 0.0

    def compose(self) -> ComposeResult:
        """Top bar, the panels, the plan bar and the key footer."""
        yield TopBar(id="top-bar")
        with Horizontal(id="panels"):
            with Vertical(id="left"):
                yield MemoryPanel(id="memory")
                yield SelftestPanel(self.settings.selftest_max_age, id="selftest")
            yield ServicesPanel(id="services")
        yield PlanBar(id="plan-bar")
        yield Footer()

    def on_mount(self) -> None:
        """First read now, then every ``refresh`` seconds."""
        self.action_refresh()
        self.set_interval(self.settings.refresh, self.action_refresh)

    def on_unmount(self) -> None:
        """Stop a running self-test with the dashboard."""
        if self.selftest_job is not None:
            self.selftest_job.cancel()

    # --- reading ---

    def action_refresh(self) -> None:
        """Start a read of every source that is not still busy with the previous one."""
        self.now = self.settings.sources.clock()
        self.query_one(TopBar).show(now=self.now)
        for name, source in self.settings.sources.by_name().items():
            if name not in self._in_flight:
                self._in_flight.add(name)
                self._read(name, source)

    @work(thread=True, group="sources")
    def _read(self, name: str, source: Source[Any]) -> None:
        self.post_message(self.PartRead(name, read_part(name, source), self.settings.sources.clock()))

    @on(PartRead)
    def _part_read(self, message: PartRead) -> None:
        self._in_flight.discard(message.name)
        part, now = message.part, self.now
        # Steady state costs little: an unchanged part is not redrawn, except now and then for its ages ("5 min ago").
        last = self._drawn_at.get(message.name)
        if self.parts.get(message.name) == part and last is not None and (now - last).total_seconds() < REDRAW_AGES_S:
            return
        self.parts[message.name] = part
        self._drawn_at[message.name] = now
        if isinstance(part, ConfigPart):
            self.query_one(TopBar).show(config=part)
            self.query_one(PlanBar).show(part, self.settings.refresh)
        elif isinstance(part, MemoryPart):
            self.query_one(MemoryPanel).show(memory=part)
        elif isinstance(part, VllmPart):
            self.query_one(MemoryPanel).show(vllm=part)
            self.query_one(ServicesPanel).show_endpoints(vllm=part)
        elif isinstance(part, GatewayPart):
            self.query_one(ServicesPanel).show_endpoints(gateway=part)
        elif isinstance(part, UnitsPart):
            self.query_one(ServicesPanel).show_units(part, now)
        elif isinstance(part, SelftestPart):
            self.query_one(SelftestPanel).show(part, now)
        snapshot = self.snapshot()
        if snapshot is not None:
            self.query_one(TopBar).show(problems=problems(snapshot, now, self.settings.selftest_max_age))

    def snapshot(self) -> Snapshot | None:
        """The latest parts as one snapshot, once every source has answered at least once."""
        if any(name not in self.parts for name in PART_NAMES):
            return None
        return Snapshot(taken_at=self.now, **{name: self.parts[name] for name in PART_NAMES})

    # --- actions ---

    def action_journal(self) -> None:
        """Show the journal of the unit selected in the Services table."""
        unit = self.query_one(ServicesPanel).selected_unit()
        if unit is None:
            self.notify("No unit to show: systemd did not list any.", severity="warning")
            return
        self.app.push_screen(JournalScreen(unit, self.settings.sources.journal))

    def action_run_selftest(self) -> None:
        """Run the quick self-test in a worker (one at a time)."""
        if self.selftest_job is not None:
            self.notify("A self-test is already running.", severity="warning")
            return
        if not self.settings.selftest_argv:
            self.notify("No self-test target is configured (--selftest-target).", severity="error")
            return
        self.selftest_job = SelftestJob(self.settings.selftest_argv)
        self.selftest_outcome = None
        self._selftest_started = time.monotonic()
        self.query_one(SelftestPanel).set_progress("quick self-test starting…")
        self._run_selftest(self.selftest_job)

    @work(thread=True, group="selftest")
    def _run_selftest(self, job: SelftestJob) -> None:
        def progress(line: str) -> None:
            self.post_message(self.SelftestProgress(line))

        outcome = job.run(progress)
        self.post_message(self.SelftestFinished(outcome))

    @on(SelftestProgress)
    def _selftest_progress(self, message: SelftestProgress) -> None:
        elapsed = time.monotonic() - self._selftest_started
        self.query_one(SelftestPanel).set_progress(f"quick self-test running ({elapsed:.0f} s): {message.line[:100]}")

    @on(SelftestFinished)
    def _selftest_finished(self, message: SelftestFinished) -> None:
        self.selftest_job = None
        self.selftest_outcome = message.outcome
        self.query_one(SelftestPanel).set_progress(None)
        self.notify(message.outcome.summary, severity="information" if message.outcome.passed else "error", timeout=10)
        self._in_flight.add("selftest")
        self._read("selftest", self.settings.sources.selftest)
