"""Assembling a version folder: the staged adapter checked, moved beside `versions/`, completed with
the run's documents, summary, log and `files.json` (written last), then renamed into place whole.

`Store.commit_version` numbers the version and calls these under the store's lock; it then verifies
the version and moves the `adapter` pointer (docs/store.md).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlm.errors import RunError
from dlm.store import durable
from dlm.store.integrity import CHECKSUMS, check_safetensors, listed_files, sha256_file

PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_DOC_NAME = re.compile(r"[a-z][a-z0-9_]*")


def check_staged(staged: Path) -> None:
    """RunError unless `staged` holds an adapter as safetensors only, each file complete and finite."""
    tensors = sorted(staged.rglob("*.safetensors")) if staged.is_dir() else []
    if not tensors:
        raise RunError(
            f"refusing to keep {staged}: it holds no .safetensors adapter file",
            "the adapter was not saved; train again or `--resume`",
            str(staged),
        )
    pickles = [p.name for p in staged.rglob("*") if p.suffix in PICKLED]
    if pickles:
        raise RunError(f"refusing to keep {staged}: pickled files {pickles}", "save adapters as safetensors")
    for path in tensors:
        check_safetensors(path)


def assemble_version(
    staged: Path,
    versions: Path,
    name: str,
    run_id: str,
    metrics: Mapping[str, Any],
    documents: Mapping[str, Any] | None,
    log: Path,
) -> bool:
    """Build `versions/<name>` from `staged` by way of `versions/.<name>.tmp`; True when `staged` was
    moved (False: copied across file systems). On failure the caller's adapter is put back in
    `staged`, no assembly folder is left, and the error propagates."""
    tmp = versions / f".{name}.tmp"
    moved = durable.move_or_copy(staged, tmp)
    try:
        for key, value in (documents or {}).items():
            if not _DOC_NAME.fullmatch(key):
                raise ValueError(f"not a document name: {key!r}")
            durable.write_json(tmp / f"{key}.json", value)
        if not (tmp / "summary.json").exists():
            durable.write_json(tmp / "summary.json", {"run": run_id, "version": name, "metrics": dict(metrics)})
        if log.is_file() and not (tmp / "log.jsonl").exists():
            shutil.copyfile(log, tmp / "log.jsonl")
        files = {
            p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p, sync=True), "bytes": p.stat().st_size}
            for p in listed_files(tmp)
        }
        durable.write_json(
            tmp / CHECKSUMS, {"run": run_id, "version": name, "created": durable.now_iso(), "files": files}
        )
        os.replace(tmp, versions / name)  # the whole folder appears at once
        durable.fsync_dir(versions)
    except BaseException:
        if moved:
            with contextlib.suppress(OSError):
                os.replace(tmp, staged)  # give the caller its adapter back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return moved
