"""Small file-system helpers: atomic writes and refusing to overwrite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dlm.errors import DlmError


def atomic_write(path: Path, text: str) -> None:
    """Write `text` so that readers see the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_new(path: Path, text: str) -> None:
    """Create `path` with `text`; refuse (exit 2, nothing written) if it exists."""
    if path.exists():
        raise DlmError(f"{path} already exists; dlm never overwrites a document", "choose another file name", str(path))
    if not path.parent.exists():
        raise DlmError(f"folder {path.parent} does not exist", "create it first", str(path))
    atomic_write(path, text)
