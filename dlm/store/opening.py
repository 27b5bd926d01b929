"""Opening a store: find or create the store of a dlm_id, and make sure one store serves one document.

A store records the document it belongs to. Two different files claiming one dlm_id never share a
store; a document that moved, or whose old path now carries another id, is adopted at its new path.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from dlm.errors import DlmError, RunError
from dlm.store.store import MANIFEST, Store, store_root

_DLM_ID_LINE = re.compile(r"""^dlm_id[ \t]*:[ \t]*["']?([^\s"'#]+)""", re.M)


def open_store(home: Path, dlm_id: str, source_path: Path | None, base: str | None, *, readonly: bool = False) -> Store:
    """Create or load the store of `dlm_id` for the document at `source_path`.

    Two different files claiming one dlm_id never share a store: if the manifest's recorded source
    still exists and still carries this dlm_id, DlmError (exit 2). If it is gone (or now carries
    another id), the document was moved or re-identified and the new path is adopted.
    """
    root = store_root(home, dlm_id)
    source = Path(source_path).resolve() if source_path is not None else None
    store = Store(root, dlm_id, source, base, readonly)
    if not (root / MANIFEST).exists():
        if not readonly:
            for sub in ("versions", "runs"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            store._update(lambda m: None)  # writes the fresh manifest (or says why an old store is broken)
        return store
    recorded = store.load_manifest().get("source")
    if source is None or not recorded or _same_file(Path(recorded), source):
        return store
    other = Path(recorded)
    if _claims(other, dlm_id):
        raise DlmError(
            f"another document, {other}, already uses dlm_id {dlm_id}",
            f"`dlm twin {source} -o NEW.dlm` gives a copy its own id, or restore the original id",
            str(source),
        )
    if not readonly:
        with contextlib.suppress(RunError), store.lock():
            pass  # the lock's reconcile records the new path; a running trainer will record it itself
    return store


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _claims(path: Path, dlm_id: str) -> bool:
    """Does the document at `path` still carry `dlm_id`? Unreadable counts as yes (never share silently)."""
    if not path.is_file():
        return False
    try:
        with path.open("r", encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 16).replace("\r\n", "\n").lstrip("\ufeff")
    except OSError:
        return True
    if text.startswith("---"):  # a .dlm: only the frontmatter counts
        head, sep, _ = text[3:].partition("\n---")
        text = head if sep else text
    found = _DLM_ID_LINE.search(text)
    return found is not None and found.group(1) == dlm_id
