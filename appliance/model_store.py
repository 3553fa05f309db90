"""The model store: models copied under ``/var/lib/clinic-edge/models/NAME``, verified, read-only for services.

A model is copied file by file into ``STORE/NAME`` (a temporary name first, renamed when complete), every file's
sha256 is checked against the bundle's manifest when there is one (else against the source as read), and the
result is recorded in ``STORE/NAME/.clinic-edge-sha256.json``. Re-running with the same source changes nothing:
files whose size and recorded hash match are left alone. Files are 0644 and folders 0755, owned by root: the vLLM
user reads them and cannot change them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bundle import sha256_file
from appliance.errors import InputError

__all__ = ["RECORD", "StoredModel", "install_model"]

RECORD = ".clinic-edge-sha256.json"


@dataclass
class StoredModel:
    """Where the model went, whether anything was copied, and how many files it has."""

    path: Path
    changed: bool
    files: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": str(self.path), "changed": self.changed, "files": self.files, "bytes": self.bytes}


def _expected_hashes(source: Path, name: str, manifest: Path | None) -> dict[str, str] | None:
    """sha256 per relative path from a bundle manifest (entries ``model/NAME/...``), or None without one."""
    if manifest is None:
        return None
    data = json.loads(manifest.read_text())
    prefix = f"model/{source.name}/"
    found = {k[len(prefix) :]: v["sha256"] for k, v in data.get("files", {}).items() if k.startswith(prefix)}
    if not found:
        raise InputError(
            f"the manifest {manifest} lists no files for the model {source.name}.",
            "Use the bundle's own model folder, or leave out --manifest.",
        )
    return found


def install_model(source: Path, store: Path, name: str, manifest: Path | None = None) -> StoredModel:
    """Copy ``source`` to ``store/name`` unless it is already there; verify every file's sha256."""
    if not (source / "config.json").is_file():
        raise InputError(f"{source} has no config.json.", "Point at a model directory.")
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and p.name != RECORD)
    expected = _expected_hashes(source, name, manifest)
    if expected is not None and set(map(str, files)) != set(expected):
        missing = sorted(set(expected) - set(map(str, files)))
        raise InputError(
            f"the model in {source} does not match the bundle manifest (missing or extra files: {missing[:5]}).",
            "Copy the bundle again, then run 'clinic-edge bundle verify'.",
        )
    dest = store / name
    record_path = dest / RECORD
    try:
        record: dict[str, dict[str, Any]] = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {}
    total = sum((source / f).stat().st_size for f in files)
    up_to_date = set(record) == set(map(str, files)) and all(
        (dest / f).is_file()
        and (dest / f).stat().st_size == (source / f).stat().st_size
        and (expected is None or record[str(f)]["sha256"] == expected[str(f)])
        for f in files
    )
    if up_to_date:
        return StoredModel(dest, changed=False, files=len(files), bytes=total)

    tmp = store / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    new_record: dict[str, dict[str, Any]] = {}
    for rel in files:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        shutil.copyfile(source / rel, target)
        os.chmod(target, 0o644)
        digest = sha256_file(target)
        if expected is not None and digest != expected[str(rel)]:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(
                f"{source / rel} is corrupt: its sha256 does not match the bundle manifest.",
                "Copy the bundle again from its source, then run 'clinic-edge bundle verify'.",
            )
        new_record[str(rel)] = {"sha256": digest, "size": target.stat().st_size}
    (tmp / RECORD).write_text(json.dumps(new_record, indent=2, sort_keys=True) + "\n")
    os.chmod(tmp / RECORD, 0o644)
    for folder in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        os.chmod(folder, 0o755)  # noqa: S103 — the vLLM user must read the model (root owns it)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return StoredModel(dest, changed=True, files=len(files), bytes=total)
