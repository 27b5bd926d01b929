"""`dlm migrate`: a DocumentLanguageModel document rewritten in dlm's own format, in place.

The changes are the ones `dlm.doc.compat` makes when reading, written into the file: each is an
edit of one value's or key's own characters (as `dlm twin` edits), so comments and layout survive.
A feature dlm does not have is refused with the reading's own errors, and nothing is written; the
result is parsed and validated before the file is replaced, and the original is kept as FILE.bak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dlm.doc.authoring import _node
from dlm.doc.compat import EXPORT_KEYS, HUB_PREFIX, OPTIMIZERS, ORIGINAL_VERSIONS, translate
from dlm.doc.grammar import _PROBE, Doc, parse_doc
from dlm.doc.schema import SCHEMA_VERSION, parse_spec, raise_all
from dlm.errors import DlmError, DlmErrors

Edit = tuple[int, int, int, str]  # (line index in the file, start column, end column, new text)


def _span(node: yaml.Node, first: int) -> tuple[int, int, int]:
    start, stop = node.start_mark, node.end_mark
    if start.line != stop.line:
        raise DlmError("a value to migrate is written over several lines", "write it on one line, then migrate again")
    return first + start.line, start.column, stop.column


def _frontmatter_edits(doc: Doc, lines: list[str]) -> tuple[list[Edit], list[str]]:
    spec_file = doc.path.lower().endswith((".yaml", ".yml"))
    first, end = (0, len(lines)) if spec_file else (1, doc.body_line - 2)  # a .dlm: between the `---` lines
    root = yaml.compose("\n".join(lines[first:end]) + "\n")
    edits: list[Edit] = []
    changes: list[str] = []

    def value(keys: tuple[str, ...]) -> tuple[yaml.MappingNode | None, yaml.Node | None]:
        return _node(root, keys)

    def change(node: yaml.Node, new: str, what: str) -> None:
        i, a, b = _span(node, first)
        edits.append((i, a, b, new))
        changes.append(f"{i + 1}: {what}")

    fm = doc.frontmatter
    _, node = value(("dlm_version",))
    if node is not None and fm.get("dlm_version") in ORIGINAL_VERSIONS:
        change(node, str(SCHEMA_VERSION), f"dlm_version {fm['dlm_version']} -> {SCHEMA_VERSION} (dlm's format)")
    _, node = value(("base_model",))
    base = fm.get("base_model")
    if node is not None and isinstance(base, str) and base.startswith(HUB_PREFIX):
        change(node, base[len(HUB_PREFIX) :], f"base_model {base} -> {base[len(HUB_PREFIX) :]} (a hub id)")
    parent, _ = value(("export", "default_quant"))
    export = fm.get("export")
    if isinstance(export, dict) and parent is not None:
        for key_node, _v in parent.value:
            new = EXPORT_KEYS.get(key_node.value)
            if new and new not in export:
                change(key_node, new, f"export.{key_node.value} -> export.{new}")
    raw_training = fm.get("training")
    training: dict[str, Any] = raw_training if isinstance(raw_training, dict) else {}
    _, node = value(("training", "optimizer"))
    if node is not None and isinstance(training.get("optimizer"), str) and training["optimizer"] in OPTIMIZERS:
        old = training["optimizer"]
        change(node, OPTIMIZERS[old], f"training.optimizer {old} -> {OPTIMIZERS[old]} (the same 8-bit AdamW)")
    _, node = value(("training", "precision"))
    if node is not None and "precision" in training and training["precision"] is None:
        if node.start_mark.index == node.end_mark.index:  # `precision:` with nothing after it
            i = first + node.start_mark.line
            edits.append((i, len(lines[i].split("#")[0].rstrip()), len(lines[i].split("#")[0].rstrip()), " auto"))
            changes.append(f"{i + 1}: training.precision null -> auto (the planner picks)")
        else:
            change(node, "auto", "training.precision null -> auto (the planner picks)")
    return edits, changes


def _body_edits(doc: Doc, lines: list[str]) -> tuple[dict[int, str], dict[int, str], list[str]]:
    """`### Q !probe` pairs into `::instruction heldout::` sections: (replace, insert before, changes)."""
    replace: dict[int, str] = {}
    before: dict[int, str] = {}
    changes: list[str] = []
    groups: dict[int, list[Any]] = {}
    for s in doc.sections:
        if s.path == doc.path and s.kind == "instruction":
            groups.setdefault(s.line, []).append(s)
    for fence, runs in groups.items():
        probes = [p.line for s in runs for p in s.pairs if _PROBE.fullmatch(lines[p.line - 1].strip())]
        if not probes:
            continue
        for n in probes:
            replace[n - 1] = lines[n - 1].replace("!probe", "").rstrip()
        if len(runs) > 1 or not lines[fence - 1].strip().startswith("::instruction heldout"):
            for k, run in enumerate(runs):
                fence_text = "::instruction heldout::" if run.heldout else "::instruction::"
                if k == 0:
                    if run.heldout:
                        replace[fence - 1] = fence_text
                else:
                    before[run.pairs[0].line - 1] = fence_text
        changes.append(f"{fence}: {len(probes)} `### Q !probe` pair(s) -> `### Q` in ::instruction heldout:: sections")
    return replace, before, changes


def migrate_text(text: str, path: str) -> tuple[str, list[str]]:
    """(the document in dlm's format, the changes made, one line each); raises what cannot be mapped."""
    doc = parse_doc(text, path, collect=True)
    errors = list(doc.problems)
    if doc.yaml_ok:
        errors += translate(doc.frontmatter, doc.positions, path)[2]
    raise_all(errors)
    lines = doc.text.split("\n")
    edits, changes = _frontmatter_edits(doc, lines)
    for i, a, b, new in sorted(edits, reverse=True):
        lines[i] = lines[i][:a] + new + lines[i][b:]
    replace, before, body_changes = _body_edits(doc, lines)
    out: list[str] = []
    for i, line in enumerate(lines):
        if i in before:
            out.append(before[i])
        out.append(replace.get(i, line))
    new_text = "\n".join(out)
    try:
        checked = parse_doc(new_text, path)
        parse_spec(checked.frontmatter, checked.positions, path)
    except DlmError as exc:
        problems = exc.errors if isinstance(exc, DlmErrors) else [exc]
        shown = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in problems)
        raise DlmError(
            f"the migrated document would not be valid, so nothing was written: {shown}",
            problems[0].hint or "fix these in the original, then migrate again",
            path,
        ) from None
    return new_text, sorted(changes + body_changes, key=lambda c: int(c.split(":")[0]))


def migrate_file(file: Path, dry_run: bool = False) -> tuple[list[str], Path | None]:
    """Rewrite `file` in place (FILE.bak keeps the original); (changes, the backup or None)."""
    from dlm.doc.datafiles import MAX_BYTES, decode, read_bytes
    from dlm.fsutil import atomic_write

    shown = str(file)
    raw = read_bytes(file, shown, MAX_BYTES)
    text = decode(raw, shown)
    new_text, changes = migrate_text(text, shown)
    if not changes or dry_run:
        return changes, None
    backup = file.with_name(file.name + ".bak")
    if backup.exists():
        raise DlmError(
            f"{backup} exists already; migrating would overwrite it", "move it away, then migrate again", shown
        )
    try:
        with open(backup, "xb") as fh:  # the original's bytes, as they were
            fh.write(raw)
    except FileExistsError:
        raise DlmError(f"{backup} appeared while migrating", "move it away, then migrate again", shown) from None
    atomic_write(file, new_text)
    return changes, backup
