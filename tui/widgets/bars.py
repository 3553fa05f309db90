"""Small Rich text helpers shared by the panels: bars, byte sizes, N/A."""

from __future__ import annotations

from rich.text import Text

__all__ = ["GIB", "bar", "gib", "na"]

GIB = 1024**3


def gib(value: float | None) -> str:
    """Bytes as GiB with one decimal, or ``N/A``."""
    return "N/A" if value is None else f"{value / GIB:.1f} GiB"


def na(value: object, fmt: str = "{}") -> str:
    """``fmt`` applied to ``value``, or ``N/A`` when it is ``None``."""
    return "N/A" if value is None else fmt.format(value)


def bar(fraction: float | None, width: int = 24, warn_at: float = 0.9) -> Text:
    """A bar like ``████████░░░░`` for a fraction 0..1 (``None``: an empty dim bar labelled N/A)."""
    if fraction is None:
        return Text("░" * width, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "bold red" if fraction >= warn_at else "green"
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))
