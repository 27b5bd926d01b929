"""Which adapter is a document's current one, whether it is stale, and the store as data.

Read-only policy shared by `dlm prompt`, `show`, `export` and `compare` (and by training, which
records the same document and corpus hashes): a version is current only when the `adapter` pointer
names it and its recorded checksums verify; it is stale when the document's text changed since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlm.errors import RunError
from dlm.plan.hardware import HardwareFacts, probe_light
from dlm.plan.prepare import Prepared, prepare
from dlm.store.integrity import verify
from dlm.store.opening import open_store
from dlm.store.store import Store


@dataclass(frozen=True)
class Current:
    prepared: Prepared
    store: Store
    version_dir: Path  # checksums verified
    summary: dict[str, Any]
    stale: bool  # the document's text changed since this version's run


def doc_sha256(prepared: Prepared) -> str:
    # the document's text, plus its data files' and sources' paths and bytes when it has any (the
    # same value as the text's own hash otherwise), so editing one of those files makes it stale
    return prepared.doc.sha256


def corpus_sha256(prepared: Prepared) -> str:
    """One hash of every example (train and held-out) and the split: twins that differ only in
    their frontmatter's knobs hash alike; another corpus, system prompt or split does not."""
    h = hashlib.sha256()
    for part, exs in (("train", prepared.train), ("heldout", prepared.heldout)):
        for ex in sorted(exs, key=lambda e: e.id):
            fields: list[Any] = [part, ex.kind, ex.text, ex.prompt, ex.completion, ex.rejected, ex.system]
            fields += [ex.history] if ex.history else []  # a conversation's earlier turns; others hash as before
            h.update(json.dumps(fields, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def current(path: str | Path, home: Path, hardware: HardwareFacts | None = None) -> Current:
    """The document's current adapter, verified against its recorded checksums, and its summary."""

    prepared = prepare(path, hardware or probe_light(), purpose="prompt")
    spec = prepared.spec
    store = open_store(home, spec.dlm_id, Path(prepared.doc.path), spec.base_model, readonly=True)
    folder = store.current_version()
    if folder is None:
        raise RunError(
            f"{prepared.doc.path} has no trained adapter yet", f"run `dlm train {path}` first", prepared.doc.path
        )
    verify(folder)
    try:
        summary = json.loads((folder / "summary.json").read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(
            f"{folder / 'summary.json'} cannot be read ({exc})", "train again to write a fresh version", str(folder)
        ) from None
    return Current(prepared, store, folder, summary, summary.get("doc_sha256") != doc_sha256(prepared))


def describe(path: str | Path, home: Path) -> dict[str, Any]:
    """`dlm show`: the store as data (JSON-ready). A damaged current version is reported, not loaded."""

    prepared = prepare(path, probe_light(), purpose="inspect")
    spec = prepared.spec
    store = open_store(home, spec.dlm_id, Path(prepared.doc.path), spec.base_model, readonly=True)
    manifest = store.load_manifest()  # a fresh one when nothing was trained yet
    folder, damage = None, None
    try:
        folder = store.current_version()
        if folder is not None:
            verify(folder)
    except RunError as exc:
        damage = exc.render()
    versions = []
    for v in store.versions():
        summary, metrics = _read_json(v / "summary.json"), _read_json(v / "metrics.json")
        versions.append(
            {
                "version": v.name,
                "path": str(v),
                "run": summary.get("run"),
                "doc_sha256": summary.get("doc_sha256"),
                "bytes": sum(p.stat().st_size for p in v.rglob("*") if p.is_file()),
                "learning": metrics.get("learning"),  # the learning report (null: none was made)
                "preference": metrics.get("preference"),  # objective dpo: accuracy and margin (null: sft)
            }
        )
    current_summary = next((v for v in versions if folder is not None and v["version"] == folder.name), None)
    return {
        "dlm_show": 1,
        "dlm_id": spec.dlm_id,
        "source": prepared.doc.path,
        "base": spec.base_model,
        "store": str(store.root),
        "current": folder.name if folder is not None else None,
        "stale": bool(current_summary and current_summary["doc_sha256"] != doc_sha256(prepared)),
        "damaged": damage,
        "versions": versions,
        "runs": manifest["runs"],
    }


def _read_json(path: Path) -> dict[str, Any]:
    """A version's JSON document, or {} when it is missing or unreadable (older versions have no
    metrics.json; a damaged one is reported by `verify`, not here)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
