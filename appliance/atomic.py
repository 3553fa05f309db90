"""Write a file so that readers see the old content or the new, never half of it.

Used for everything another process reads while we write: the planner's env files (systemd), the workstation
keys (the gateway re-reads them on change) and the self-test results (the dashboard).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text"]


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644, keep_owner: bool = False) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, fsync, then rename over it.

    ``mode`` is set before the content lands, so a secret is never readable by others, not even briefly.
    With ``keep_owner`` an existing file's owner and group carry over (when we are allowed to set them).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if keep_owner and path.exists():
            st = path.stat()
            with contextlib.suppress(PermissionError):
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
