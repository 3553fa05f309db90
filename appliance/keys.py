"""Workstation API keys: created once, stored only as SHA-256 hashes, checked in constant time.

The keys file (``/etc/clinic-edge/keys.json``, mode 0600) is a JSON document::

    {"version": 1, "keys": [{"name": "reception-1", "sha256": "<hex>", "created_at": "<ISO-8601 UTC>"}]}

A key is ``ce_`` followed by 43 URL-safe characters (256 random bits). Such a key cannot be guessed, so a plain
SHA-256 is the right hash (a slow password hash buys nothing and would cost every request). The gateway keeps a
:class:`KeyStore` that re-reads the file when its modification time, size or inode changes, so ``clinic-edge keys
revoke`` takes effect on the very next request without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_text
from appliance.errors import InputError, UsageError

__all__ = ["KEY_PREFIX", "KeyRecord", "KeyStore", "add_key", "hash_key", "list_keys", "load_keys", "revoke_key"]

KEY_PREFIX = "ce_"
FILE_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One workstation key as stored: its name, the hex SHA-256 of the key and when it was made."""

    name: str
    sha256: str
    created_at: str

    def to_dict(self) -> dict[str, str]:
        """The record as written to the keys file."""
        return {"name": self.name, "sha256": self.sha256, "created_at": self.created_at}


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key (what the keys file stores)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def load_keys(path: Path) -> list[KeyRecord]:
    """Read the keys file; a missing file means no keys. Raises :class:`InputError` when it is malformed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise InputError(
            f"Cannot read the keys file {path}: {err.strerror}.",
            "Run as the gateway's user (or root), or fix the file's owner and mode (0600).",
        ) from err
    try:
        doc: Any = json.loads(raw) if raw.strip() else {"version": FILE_VERSION, "keys": []}
        records = [KeyRecord(str(k["name"]), str(k["sha256"]), str(k.get("created_at", ""))) for k in doc["keys"]]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"The keys file {path} is not a clinic-edge keys file ({err.__class__.__name__}).",
            "Restore it from backup, or move it away and add the workstation keys again with 'clinic-edge keys add'.",
        ) from err
    for rec in records:
        if len(rec.sha256) != 64:
            raise InputError(
                f"The keys file {path} has an entry '{rec.name}' without a SHA-256 hash.",
                "Remove that entry (keys revoke NAME) and add the key again.",
            )
    return records


def _write_keys(path: Path, records: list[KeyRecord]) -> None:
    """Replace the keys file atomically, mode 0600 from the first byte."""
    doc: dict[str, Any] = {"version": FILE_VERSION, "keys": [r.to_dict() for r in records]}
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep_owner: the gateway user must still own the file after root rewrites it.
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n", mode=0o600, keep_owner=True)


def add_key(path: Path, name: str) -> str:
    """Create a key named ``name``, store its hash and return the key (the only time it exists in clear)."""
    if not _NAME_RE.match(name):
        raise UsageError(
            f"'{name}' is not a usable key name.",
            "Use 1-64 letters, digits, dots, dashes or underscores, starting with a letter or digit "
            "(e.g. reception-1).",
        )
    records = load_keys(path)
    if any(r.name == name for r in records):
        raise UsageError(
            f"A key named '{name}' already exists in {path}.",
            f"Pick another name, or replace it: clinic-edge keys revoke {name} --keys-file {path}, then add it again.",
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    _write_keys(path, [*records, KeyRecord(name, hash_key(key), created)])
    return key


def revoke_key(path: Path, name: str) -> bool:
    """Remove the key named ``name``; False when there was none."""
    records = load_keys(path)
    kept = [r for r in records if r.name != name]
    if len(kept) == len(records):
        return False
    _write_keys(path, kept)
    return True


def list_keys(path: Path) -> list[KeyRecord]:
    """The stored keys (names and dates; the hashes are not secrets but are not shown)."""
    return load_keys(path)


class KeyStore:
    """The gateway's view of the keys file, re-read whenever the file changes (checked on every request)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._hashes: list[tuple[bytes, str]] = []
        self.last_error: str | None = None
        self.refresh()

    def refresh(self) -> None:
        """Reload the file if its mtime, size or inode changed. A broken file keeps the last good keys."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        try:
            records = load_keys(self.path)
        except InputError as err:
            self.last_error = err.message
            return
        self._hashes = [(bytes.fromhex(r.sha256), r.name) for r in records]
        self._stamp = stamp
        self.last_error = None

    def __len__(self) -> int:
        return len(self._hashes)

    def authenticate(self, key: str) -> str | None:
        """The name of the key, or None. Compares against every stored hash in constant time."""
        self.refresh()
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for stored, name in self._hashes:
            if hmac.compare_digest(stored, digest):
                found = name
        return found
