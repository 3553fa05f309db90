"""Test support for the dashboard: replayed scenarios, plain text of widgets, and SVG snapshots.

Snapshots are ``app.export_screenshot()`` at a fixed size, compared with files under tests/snapshots/dashboard/.
Regenerate them (after checking the change is intended) with ``CLINIC_EDGE_SNAPSHOT_UPDATE=1``.
pytest-textual-snapshot 1.1.0 pins syrupy==4.8.0, which requires pytest<9 (we run pytest 9), so this small helper
stands in.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from appliance.telemetry.replay import load_scenario, replay_sources
from appliance.telemetry.sources import Sources

FIXTURES = Path(__file__).parent / "fixtures" / "dashboard"
SNAPSHOTS = Path(__file__).parent / "snapshots" / "dashboard"
SCENARIOS = sorted(p.stem for p in FIXTURES.glob("*.json"))
SIZE = (120, 40)


def scenario_sources(name: str, root: Path) -> Sources:
    """Sources replaying the recorded scenario ``name`` (its files written under ``root``)."""
    return replay_sources(load_scenario(FIXTURES / f"{name}.json"), root)


def plain(content: Any, width: int = 100) -> str:
    """A Rich renderable (or a Static's content) as plain text."""
    console = Console(width=width, file=io.StringIO(), color_system=None, record=True)
    console.print(content)
    return console.export_text()


def _visible_text(svg: str) -> str:
    texts = re.findall(r">([^<>]*)</text>", svg)
    return "\n".join(t.replace("&#160;", " ") for t in texts)


def assert_snapshot(svg: str, name: str) -> None:
    """Compare ``svg`` with the committed snapshot ``name``.svg (write it when updating or when it is new)."""
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("CLINIC_EDGE_SNAPSHOT_UPDATE") == "1" or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(svg)
        if os.environ.get("CI", "").lower() == "true" and os.environ.get("CLINIC_EDGE_SNAPSHOT_UPDATE") != "1":
            raise AssertionError(f"snapshot {path.name} was missing; it has been written, commit it")
        return
    expected = path.read_text()
    if svg != expected:
        diff = "\n".join(
            difflib.unified_diff(
                _visible_text(expected).splitlines(), _visible_text(svg).splitlines(), "committed", "now", lineterm=""
            )
        )
        raise AssertionError(
            f"the screen differs from {path} (set CLINIC_EDGE_SNAPSHOT_UPDATE=1 to accept):\n{diff or '(styles only)'}"
        )
