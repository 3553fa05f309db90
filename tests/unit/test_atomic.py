from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from appliance.atomic import atomic_write_text


def test_writes_with_mode_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "keys.json"
    atomic_write_text(target, "one", mode=0o600)
    assert target.read_text() == "one" and stat.S_IMODE(target.stat().st_mode) == 0o600
    atomic_write_text(target, "two", mode=0o600, keep_owner=True)
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["keys.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "latest.json"
    atomic_write_text(target, "old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"]
