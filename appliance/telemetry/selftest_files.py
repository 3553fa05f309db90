"""Self-test results on disk: ``latest.json`` and one ``<UTC timestamp>.json`` per run (schema 1).

The writer is another part of clinic-edge; this reader is defensive: a missing field is ``None``, a file that is
not valid JSON is skipped (and counted), and files are parsed once per modification time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.telemetry.parts import SelftestPart, SelftestRun

__all__ = ["SelftestSource", "parse_run", "results_dir"]

HISTORY_LIMIT = 60  # the plot shows at most this many runs


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _num(doc: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return float(doc) if isinstance(doc, int | float) and not isinstance(doc, bool) else None


def parse_run(doc: Any, fallback_id: str) -> SelftestRun | None:
    """The dashboard's view of one result document; ``None`` when it is not a result at all."""
    if not isinstance(doc, dict):
        return None
    verdict: dict[str, Any] = doc["verdict"] if isinstance(doc.get("verdict"), dict) else {}
    summary: dict[str, Any] = doc["summary"] if isinstance(doc.get("summary"), dict) else {}
    passed = verdict.get("passed")
    completed, failed = _num(summary, "completed"), _num(summary, "failed")
    return SelftestRun(
        id=str(doc.get("id") or fallback_id),
        started_at=_time(doc.get("started_at")),
        finished_at=_time(doc.get("finished_at")),
        mode=doc.get("mode") if isinstance(doc.get("mode"), str) else None,
        passed=passed if isinstance(passed, bool) else None,
        reason=str(verdict.get("reason") or ""),
        ttft_p50_ms=_num(summary, "ttft_ms", "p50"),
        ttft_p99_ms=_num(summary, "ttft_ms", "p99"),
        tpot_p50_ms=_num(summary, "tpot_ms", "p50"),
        request_throughput=_num(summary, "request_throughput"),
        output_throughput=_num(summary, "output_throughput"),
        completed=int(completed) if completed is not None else None,
        failed=int(failed) if failed is not None else None,
    )


def results_dir(state_dir: Path) -> Path:
    """``STATE/selftest`` — or ``STATE`` itself when it already is the results folder."""
    nested = state_dir / "selftest"
    if nested.is_dir() or not (state_dir / "latest.json").exists():
        return nested
    return state_dir


class SelftestSource:
    """Reads the latest result and the history from the state directory."""

    name = "selftest"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._cache: dict[Path, tuple[float, SelftestRun | None]] = {}

    def _load(self, path: Path) -> SelftestRun | None:
        mtime = path.stat().st_mtime
        cached = self._cache.get(path)
        if cached and cached[0] == mtime:
            return cached[1]
        try:
            run = parse_run(json.loads(path.read_text()), path.stem)
        except (OSError, ValueError):
            run = None
        self._cache[path] = (mtime, run)
        return run

    def read(self) -> SelftestPart:
        """Latest run (``latest.json``, else the newest history file) and up to 60 runs of history."""
        folder = results_dir(self.state_dir)
        if not folder.is_dir():
            return SelftestPart(directory=str(folder))
        try:
            files = sorted(p for p in folder.glob("*.json") if p.name != "latest.json")[-HISTORY_LIMIT:]
            history = [r for r in (self._load(p) for p in files) if r is not None]
            latest_file = folder / "latest.json"
            latest = self._load(latest_file) if latest_file.exists() else None
        except OSError as exc:
            return SelftestPart(directory=str(folder), error=f"cannot read {folder}: {exc.strerror or exc}")
        latest = latest or (history[-1] if history else None)
        if latest is not None and all(r.id != latest.id for r in history):
            history.append(latest)
        epoch = datetime.min.replace(tzinfo=UTC)
        history.sort(key=lambda r: r.when or epoch)
        return SelftestPart(latest=latest, history=history, directory=str(folder))
