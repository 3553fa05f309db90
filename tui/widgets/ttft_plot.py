"""A small text plot of TTFT p50 (bars) and p99 (dots) over the self-test history."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

__all__ = ["plot_ttft"]

EIGHTHS = " ▁▂▃▄▅▆▇█"


def plot_ttft(p50: Sequence[float | None], p99: Sequence[float | None], height: int = 6, width: int = 48) -> Text:
    """Rows of a plot, newest run on the right: p50 as bars, p99 as ``●``; a missing value leaves a gap."""
    p50, p99 = list(p50)[-width:], list(p99)[-width:]
    values = [v for v in (*p50, *p99) if v is not None]
    if not values:
        return Text("no TTFT figures in the history yet", style="dim")
    top = max(values) or 1.0
    label_w = len(f"{top:.0f}") + 3
    lines: list[Text] = []
    for row in range(height, 0, -1):  # row 1 is the bottom
        label = f"{top:.0f} ms" if row == height else ("0 ms" if row == 1 else "")
        line = Text(label.rjust(label_w) + " ┤", style="dim")
        for low, high in zip(p50, p99, strict=True):
            cell, style = " ", ""
            if low is not None:
                eighths = round(low / top * height * 8)
                filled = eighths - (row - 1) * 8
                if filled > 0:
                    cell, style = EIGHTHS[min(filled, 8)], "cyan"
            if high is not None and max(1, round(high / top * height)) == row:
                cell, style = "●", "bold yellow"
            line.append(cell, style=style)
        lines.append(line)
    legend = Text.assemble(
        " " * (label_w + 2), ("█", "cyan"), " p50  ", ("●", "bold yellow"), f" p99  ({len(p50)} runs)"
    )
    lines.append(legend)
    return Text("\n").join(lines)
