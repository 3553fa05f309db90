"""The clinic-edge dashboard app: settings in, the main screen up, global keys. Everything else lives in
``screens/`` and ``widgets/``; the data comes from :mod:`appliance.telemetry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

from textual.app import App
from textual.binding import Binding, BindingType

from appliance.telemetry.health import DEFAULT_SELFTEST_MAX_AGE
from appliance.telemetry.sources import Sources
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen

__all__ = ["DashboardApp", "DashboardSettings"]


@dataclass
class DashboardSettings:
    """What the dashboard reads, how often, and how it runs the quick self-test."""

    sources: Sources
    refresh: float = 2.0
    selftest_argv: list[str] | None = None
    selftest_max_age: timedelta = DEFAULT_SELFTEST_MAX_AGE


class DashboardApp(App[None]):
    """``clinic-edge dashboard``."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "clinic-edge dashboard"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        Binding("question_mark", "help", "help", key_display="?"),
    ]

    def __init__(self, settings: DashboardSettings) -> None:
        super().__init__()
        self.settings = settings
        self.main_screen = MainScreen(settings)

    def on_mount(self) -> None:
        """Show the main screen."""
        self.push_screen(self.main_screen)

    def action_help(self) -> None:
        """Show the help screen."""
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())
