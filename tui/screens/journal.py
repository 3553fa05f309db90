"""The journal screen: the last lines of one unit's journal, read in a worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Static

from appliance.telemetry.systemd import JournalResult

__all__ = ["JournalScreen"]

JOURNAL_LINES = 50


class JournalScreen(ModalScreen[None]):
    """``journalctl -u UNIT -n 50`` in a scrollable box; escape closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,j", "dismiss", "close")]

    class Loaded(Message):
        """The journal was read (or could not be)."""

        def __init__(self, result: JournalResult) -> None:
            super().__init__()
            self.result = result

    def __init__(self, unit: str, read: Callable[[str, int], JournalResult]) -> None:
        super().__init__()
        self.unit = unit
        self._read = read
        self.result: JournalResult | None = None

    def compose(self) -> ComposeResult:
        """A title line and the journal text."""
        with VerticalScroll(id="journal-box") as box:
            box.border_title = f"journal: {self.unit} (last {JOURNAL_LINES} lines) — escape closes"
            yield Static(Text("reading the journal…", style="dim"), id="journal-text")

    def on_mount(self) -> None:
        """Start reading."""
        self._load()

    @work(thread=True, exclusive=True)
    def _load(self) -> None:
        self.post_message(self.Loaded(self._read(self.unit, JOURNAL_LINES)))

    @on(Loaded)
    def _show(self, message: Loaded) -> None:
        self.result = message.result
        text = (
            Text(f"✖ {message.result.error}", style="bold red")
            if message.result.error
            else Text("\n".join(message.result.lines) or "(the journal is empty)")
        )
        self.query_one("#journal-text", Static).update(text)
