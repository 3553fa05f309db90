"""Self-test results on disk: one JSON file per run, ``latest.json`` beside them, retention, and the history table.

Layout (docs/interfaces.md): ``<state dir>/<UTC timestamp>.json`` per run (e.g. ``20261123T020000Z.json``) and
``latest.json``, a *copy* of the newest run, written atomically (temporary file + rename) so the dashboard never
reads half a file. Retention keeps the newest ``keep`` runs; nothing else in the folder is touched.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_text
from appliance.errors import InputError

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_STATE_DIR",
    "LATEST",
    "HistoryEntry",
    "check_writable",
    "history_rows",
    "history_table",
    "load_history",
    "prune",
    "run_files",
    "save_run",
]

DEFAULT_STATE_DIR = Path("/var/lib/clinic-edge/selftest")
DEFAULT_KEEP = 90
LATEST = "latest.json"
RUN_FILE = re.compile(r"^\d{8}T\d{6}Z(?:-\d+)?\.json$")


def check_writable(state_dir: Path) -> None:
    """Create ``state_dir`` if needed and prove we can write there — before a run, so no result is lost after it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".probe-", delete=True):
            pass
    except OSError as exc:
        raise InputError(
            f"Cannot write self-test results to {state_dir}: {exc.strerror or exc}.",
            "Run as root (sudo) or as the clinic-edge user, or choose another folder with --state-dir DIR.",
        ) from exc


def save_run(state_dir: Path, doc: dict[str, Any], keep: int = DEFAULT_KEEP) -> Path:
    """Write the run's file and ``latest.json``; prune to the newest ``keep`` runs. Returns the run's path.

    The file is named after ``doc["id"]`` (a UTC timestamp); a second run in the same second gets ``-1``, ``-2``….
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    stem = str(doc["id"])
    path = state_dir / f"{stem}.json"
    n = 0
    while path.exists():
        n += 1
        path = state_dir / f"{stem}-{n}.json"
    if n:
        doc["id"] = path.stem
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_text(path, text)
    atomic_write_text(state_dir / LATEST, text)
    prune(state_dir, keep)
    return path


def run_files(state_dir: Path) -> list[Path]:
    """The run files, oldest first (names sort by time)."""
    if not state_dir.is_dir():
        return []
    files = [p for p in state_dir.iterdir() if RUN_FILE.match(p.name) and p.is_file()]
    return sorted(files, key=lambda p: _sort_key(p.name))


def _sort_key(name: str) -> tuple[str, int]:
    stem = name.removesuffix(".json")
    base, _, n = stem.partition("-")
    return base, int(n or 0)


def prune(state_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` run files; return what was deleted."""
    files = run_files(state_dir)
    doomed = files[: max(0, len(files) - max(1, keep))]
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return doomed


@dataclass(frozen=True)
class HistoryEntry:
    """One past run as the history table shows it (``doc`` is ``None`` when the file could not be read)."""

    path: Path
    doc: dict[str, Any] | None
    problem: str | None = None


def load_history(state_dir: Path) -> list[HistoryEntry]:
    """Every run file, oldest first; unreadable ones are listed with the problem instead of being skipped silently."""
    out = []
    for p in run_files(state_dir):
        try:
            doc = json.loads(p.read_text())
            if not isinstance(doc, dict) or doc.get("schema") != 1:
                out.append(HistoryEntry(p, None, "not a schema-1 self-test result"))
                continue
            out.append(HistoryEntry(p, doc))
        except (OSError, ValueError) as exc:
            out.append(HistoryEntry(p, None, f"unreadable: {exc}"))
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "–"


def history_rows(entries: Sequence[HistoryEntry]) -> list[dict[str, Any]]:
    """The table's rows as data (for ``--json``), newest first."""
    rows = []
    for e in reversed(entries):
        d = e.doc
        if d is None:
            rows.append({"file": e.path.name, "problem": e.problem})
            continue
        s = d.get("summary") or {}
        ttft = s.get("ttft_ms") or {}
        tpot = s.get("tpot_ms") or {}
        verdict = d.get("verdict") or {}
        rows.append(
            {
                "file": e.path.name,
                "started_at": d.get("started_at"),
                "mode": d.get("mode"),
                "target": d.get("target"),
                "model": d.get("model"),
                "ttft_p50_ms": ttft.get("p50"),
                "ttft_p99_ms": ttft.get("p99"),
                "tpot_p50_ms": tpot.get("p50"),
                "completed": s.get("completed"),
                "failed": s.get("failed"),
                "gateway_share_ms": d.get("gateway_share_ms"),
                "passed": verdict.get("passed"),
                "reason": verdict.get("reason"),
            }
        )
    return rows


def history_table(entries: Sequence[HistoryEntry]) -> str:
    """A plain-text table, newest first, that fits an 100-column terminal."""
    if not entries:
        return "No self-test results yet."
    head = ("when (UTC)", "mode", "model", "TTFT p50", "p99", "TPOT p50", "ok/failed", "gw share", "verdict")
    rows: list[tuple[str, ...]] = []
    for r in history_rows(entries):
        if "problem" in r:
            rows.append((r["file"], "", "", "", "", "", "", "", f"? {r['problem']}"[:40]))
            continue
        when = str(r["started_at"] or "").replace("T", " ").removesuffix("Z")[:16]
        rows.append(
            (
                when,
                str(r["mode"] or ""),
                str(r["model"] or "")[:24],
                _fmt(r["ttft_p50_ms"]),
                _fmt(r["ttft_p99_ms"]),
                _fmt(r["tpot_p50_ms"]),
                f"{r['completed'] or 0}/{r['failed'] or 0}",
                _fmt(r["gateway_share_ms"], 2),
                "PASS" if r["passed"] else "FAIL",
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    numeric = {3, 4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)]
    return "\n".join(s.rstrip() for s in out) + "\n(ms; newest first)"
