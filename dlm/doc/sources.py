"""`training.sources`: folders of files read as the document's prose (and `.jsonl` data).

Each source names a folder (or one file) relative to the document's folder, which it may not leave
unless `training.sources_policy: permissive`. Its files are walked in sorted order, filtered by the
`exclude` globs first and then the `include` ones, cut to `max_files`; each becomes a prose section
headed by its path relative to the source (`.jsonl` files are data files, row by row). Binary files
(a NUL byte in the first KiB), files that are not UTF-8, files over `max_bytes_per_file` and empty
ones are skipped and counted (`dlm doctor` shows the counts). The document's hash covers each file's
relative path and bytes, so editing a file makes the store's adapter stale. docs/format.md, "Sources".
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from dlm.doc.datafiles import MAX_DATA_BYTES, _jsonl
from dlm.doc.grammar import Doc, Section, SourceRead
from dlm.doc.text import check_text, normalise
from dlm.errors import DlmError

BINARY_PROBE = 1024
DEFAULT_INCLUDE = ("**/*",)


def matches(rel: str, pattern: str) -> bool:
    """Glob match on a relative POSIX path: `*` and `**` cross folders, `**/` also matches none."""
    if fnmatch.fnmatchcase(rel, pattern):
        return True
    return pattern.startswith("**/") and matches(rel, pattern[3:])


def _globs(value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return default  # a wrong type: the schema reports it at its line


def _limit(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _walk(root: Path) -> list[str]:
    if root.is_file():
        return [root.name]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        base = Path(folder).relative_to(root)
        found += [(base / f).as_posix() for f in files]
    return sorted(found)


def add_sources(doc: Doc) -> Doc:
    """The document with its sources' sections appended and their paths and bytes in its hash."""
    raw = doc.frontmatter.get("training")
    training: dict[str, Any] = raw if isinstance(raw, dict) else {}
    items = training.get("sources")
    if not isinstance(items, list) or not items:
        return doc
    permissive = training.get("sources_policy") == "permissive"
    home = Path(doc.path).parent.resolve()
    digest = hashlib.sha256(doc.sha256.encode("ascii"))
    sections, reads = list(doc.sections), []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            continue  # the schema reports it
        line, col = doc.positions.get(("training", "sources", i, "path")) or doc.positions.get(
            ("training", "sources", i), (1, 1)
        )
        root, shown_root = _root(doc, item["path"], permissive, line, col)
        include = _globs(item.get("include"), DEFAULT_INCLUDE)
        exclude = _globs(item.get("exclude"), ())
        max_files, max_bytes = _limit(item.get("max_files")), _limit(item.get("max_bytes_per_file"))
        files: list[str] = []
        skipped = dict.fromkeys(("binary", "not UTF-8", "too large", "past max_files", "empty"), 0)
        skipped["not a regular file inside the folder"] = 0
        chosen = [
            r for r in _walk(root) if not any(matches(r, p) for p in exclude) and any(matches(r, p) for p in include)
        ]
        if max_files is not None and len(chosen) > max_files:
            skipped["past max_files"] = len(chosen) - max_files
            chosen = chosen[:max_files]
        for rel in chosen:
            target = root / rel if not root.is_file() else root
            shown = f"{shown_root}/{rel}" if not root.is_file() else shown_root
            limit = min(max_bytes or MAX_DATA_BYTES, MAX_DATA_BYTES)
            real = target.resolve()
            if not real.is_file() or not (permissive or real.is_relative_to(home)):
                skipped["not a regular file inside the folder"] += 1  # a fifo, socket or a link leading out
                continue
            if real.stat().st_size > limit:
                skipped["too large"] += 1
                continue
            raw = real.read_bytes()
            if b"\0" in raw[:BINARY_PROBE]:
                skipped["binary"] += 1
                continue
            try:
                text = normalise(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["not UTF-8"] += 1
                continue
            if not text.strip():
                skipped["empty"] += 1
                continue
            check_text(text, shown)
            digest.update(b"\0" + rel.encode("utf-8") + b"\0" + raw)
            if rel.lower().endswith(".jsonl"):
                sections += _jsonl(text, shown)
            else:
                heading = os.path.normpath(os.path.join(item["path"], rel)) if not root.is_file() else item["path"]
                sections.append(Section("prose", shown, 1, text=f"# {heading}\n\n{text.strip()}"))
            files.append(shown)
        reads.append(SourceRead(item["path"], tuple(files), tuple((k, n) for k, n in skipped.items() if n)))
    return replace(doc, sections=tuple(sections), sha256=digest.hexdigest(), sources=tuple(reads))


def _root(doc: Doc, path: str, permissive: bool, line: int, col: int) -> tuple[Path, str]:
    def refuse(message: str, hint: str) -> DlmError:
        return DlmError(message, hint, doc.path, line, col)

    folder = Path(doc.path).parent
    if not path.strip() or "\0" in path:
        raise refuse(f"not a usable source path: {path!r}", "name a folder relative to the document's folder")
    target = Path(path).expanduser()
    target = target if target.is_absolute() else folder / target
    try:
        resolved, home = target.resolve(), folder.resolve()
        exists = resolved.exists()
    except (OSError, RuntimeError, ValueError) as exc:
        raise refuse(
            f"cannot resolve source path {path!r}: {exc}", "name a folder inside the document's folder"
        ) from None
    if not permissive and not resolved.is_relative_to(home):
        raise refuse(
            f"source path {path!r} leads outside the document's folder (to {resolved})",
            "move the folder under the document's folder, or allow it with `sources_policy: permissive` under training:",
        )
    if not exists:
        raise refuse(f"source folder not found: {path}", f"looked for {resolved}")
    shown = str(target) if permissive and not resolved.is_relative_to(home) else str(folder / path)
    return resolved, os.path.normpath(shown)
