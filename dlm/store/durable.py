"""Durable writes for the store: strict JSON replaced atomically, folder fsyncs, UTC timestamps.

Every JSON file of a store goes through `write_json`: a temp file in its own folder, fsynced and
renamed over the old one, then the folder fsynced, so a crash leaves the old file or the new one.
Callers use it as `durable.write_json` so that one name is the single seam for every store write
(the fault tests replace it to simulate a full disk).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlm.fsutil import atomic_write


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def write_json(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never half of either (strict JSON: no NaN)."""
    atomic_write(path, json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    fsync_dir(path.parent)


def _finite(value: Any) -> Any:
    """NaN/inf are not JSON; a metric that blew up is recorded as null (the run's message says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a folder
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def move_or_copy(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` (True); across file systems, copy it instead (False)."""
    try:
        os.rename(src, dst)
        return True
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    shutil.copytree(src, dst)
    return False
