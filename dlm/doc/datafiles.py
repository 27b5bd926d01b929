"""File reading for `read_doc`: strict UTF-8 decoding, size limits, and the `data:` files.

A data path must be relative and stay inside the document's folder. `.jsonl` rows come in three
shapes (`text`, `prompt`/`completion`, `messages`), `.md`/`.txt` files are prose, `.dlm` files lend
their body. Errors name the data file with its row and column; a path that is missing or refused is
reported at its item in the document. See docs/format.md.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from dlm.doc.grammar import QA, Doc, Section, parse_doc
from dlm.doc.text import MAX_BYTES, check_text, join_surrogates, line_col, normalise
from dlm.errors import DlmError

MAX_DATA_BYTES = 256 * 2**20  # per data file; every file is read whole (for its hash) before training
SUFFIXES = (".jsonl", ".md", ".txt", ".dlm")
ROLES = ("system", "user", "assistant")
_ROW_KEYS = ("text", "prompt", "completion", "messages", "heldout")
_SHAPES = ({"text"}, {"prompt", "completion"}, {"messages"})
_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
ROW_HINT = 'each row is one JSON object: {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]}'


def decode(raw: bytes, path: str) -> str:
    """Strict UTF-8 -> normalised text; an invalid byte is reported at its own line and column."""
    try:
        return normalise(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        head = normalise(raw[: exc.start].decode("utf-8"))  # valid up to the first bad byte
        line, col = line_col(head, len(head))
        raise DlmError(
            f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
            "save the file as UTF-8 (most editors: 'Save with encoding')",
            path,
            line,
            col,
        ) from None


def read_bytes(path: Path, shown: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)  # never read more than we would accept
    except FileNotFoundError:
        raise DlmError("no such file", "check the path (it is relative to the current folder)", shown) from None
    except IsADirectoryError:
        raise DlmError("is a folder, not a file", "name a .dlm document or a .yaml spec", shown) from None
    except OSError as exc:
        raise DlmError(f"cannot read the file: {exc.strerror or exc}", "check its permissions", shown) from None
    if len(raw) > limit:  # at 1:1, so the message keeps the `path:line:col:` shape of every bad-input error
        raise DlmError(
            f"the file is larger than {limit // 2**20} MiB", "see the size limits in docs/format.md", shown, 1, 1
        )
    return raw


def add_data(doc: Doc) -> Doc:
    """The document with its data files' sections appended and their bytes in its hash."""
    items = doc.frontmatter.get("data")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        return doc  # not a list of strings: the schema reports it at its own line
    if not items:
        return doc
    digest = hashlib.sha256(doc.text.encode("utf-8"))
    sections, shown_all = list(doc.sections), []
    for i, item in enumerate(items):
        target, shown = _locate(doc, i, item)
        raw = read_bytes(target, shown, MAX_DATA_BYTES)
        digest.update(b"\0" + raw)  # a changed data file changes the document's identity
        sections += _sections(decode(raw, shown), shown, target.suffix.lower())
        shown_all.append(shown)
    return replace(doc, sections=tuple(sections), sha256=digest.hexdigest(), data_files=tuple(shown_all))


def _locate(doc: Doc, i: int, item: str) -> tuple[Path, str]:
    """Apply the path policy to `data[i]`: relative, inside the document's folder, an existing file."""
    line, col = doc.positions.get(("data", i), doc.positions.get(("data",), (1, 1)))

    def refuse(message: str, hint: str) -> DlmError:
        return DlmError(message, hint, doc.path, line, col)

    inside = "data paths are relative to the document's folder; copy the file into that folder (or a subfolder)"
    if not item.strip() or "\0" in item:
        raise refuse(f"not a usable data path: {item!r}", inside)
    if Path(item).is_absolute() or item.startswith("~"):
        raise refuse(f"absolute data path {item!r} is refused", inside)
    folder = Path(doc.path).parent
    target = folder / item
    # OSError/ValueError too (found by tests/test_fuzz.py): a name longer than the file system allows
    # made exists() raise ENAMETOOLONG, and a string the OS cannot encode raised ValueError.
    try:
        root, resolved = folder.resolve(), target.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop
        raise refuse(f"cannot resolve data path {item!r}: {exc}", inside) from None
    if not resolved.is_relative_to(root):
        raise refuse(f"data path {item!r} leads outside the document's folder (to {resolved})", inside)
    if target.suffix.lower() not in SUFFIXES:
        raise refuse(
            f"unsupported data file type {target.suffix or '(none)'!r}", "data files are .jsonl, .md, .txt or .dlm"
        )
    try:
        exists, is_file = target.exists(), target.is_file()
    except (OSError, ValueError) as exc:
        raise refuse(f"cannot use data path {item!r}: {getattr(exc, 'strerror', None) or exc}", inside) from None
    if not exists:
        raise refuse(f"data file not found: {item}", f"looked for {resolved}; {inside.split(';')[0]}")
    if not is_file:
        raise refuse(f"data path {item!r} is not a file", "name a .jsonl, .md, .txt or .dlm file")
    return target, str(target)


def _sections(text: str, shown: str, suffix: str) -> list[Section]:
    check_text(text, shown)
    if suffix == ".jsonl":
        return _jsonl(text, shown)
    if suffix == ".dlm":
        sections = list(parse_doc(text, shown).sections)
        if not sections:
            raise DlmError(
                "this data document has no body to contribute",
                "write prose or sections below its frontmatter",
                shown,
                1,
                1,
            )
        return sections
    return [Section("prose", shown, 1, text=text.strip())]


def _jsonl(text: str, shown: str) -> list[Section]:
    sections = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object)
        except json.JSONDecodeError as exc:
            raise DlmError(f"malformed JSON: {exc.msg}", ROW_HINT, shown, n, exc.colno) from None
        except _DuplicateKey as exc:
            first = line.find(json.dumps(exc.key))
            col = line.find(json.dumps(exc.key), first + 1) + 1 if first >= 0 else 0
            raise DlmError(
                f"duplicate key {exc.key!r} in the row",
                "remove one of them; JSON readers silently keep the last",
                shown,
                n,
                col or _first(line),
            ) from None
        except RecursionError:  # absurd nesting
            raise DlmError("unreadable JSON row: nested too deeply", ROW_HINT, shown, n, _first(line)) from None
        except ValueError:  # the only other one: an integer past Python's 4300-digit conversion limit
            raise DlmError(
                "unreadable JSON row: a number with too many digits", ROW_HINT, shown, n, _first(line)
            ) from None
        sections.append(_row(row, line, shown, n))
    return sections


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: refuse a repeated key, as the YAML reader does (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _row(row: Any, line: str, shown: str, n: int) -> Section:
    def fail(message: str, key: str | None = None, hint: str = ROW_HINT) -> DlmError:
        col = line.find(json.dumps(key)) + 1 if key else 0  # the key's column where it can be found
        return DlmError(message, hint, shown, n, col or _first(line))

    if not isinstance(row, dict):
        raise fail(f"the row is a JSON {_JSON_TYPES.get(type(row), type(row).__name__)}, not an object")
    for key in row:
        if key not in _ROW_KEYS:
            close = difflib.get_close_matches(key, _ROW_KEYS, 1, 0.6)
            raise fail(f"unknown key {key!r} in the row", key, f"did you mean {close[0]!r}?" if close else ROW_HINT)
    heldout = row.get("heldout", False)
    if not isinstance(heldout, bool):
        raise fail(f"'heldout' must be true or false (got {heldout!r})", "heldout")
    keys = set(row) - {"heldout"}
    shapes = [s for s in _SHAPES if s & keys]
    if len(shapes) != 1:
        raise fail(
            "the row mixes shapes: " + ", ".join(sorted(keys))
            if keys
            else "the row has no text, prompt/completion or messages"
        )
    lacking = sorted(shapes[0] - keys)
    if lacking:
        raise fail(f"the row has {sorted(keys)[0]!r} but no {lacking[0]!r}", sorted(keys)[0])

    def text(key: str, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise fail(f"{where} must be a string (got {_JSON_TYPES.get(type(value), type(value).__name__)})", key)
        if not value.strip():
            raise fail(f"{where} is empty", key, "write the text, or drop the row")
        # Found by tests/test_fuzz.py: "\ud800" is valid JSON but a lone surrogate is not text; it
        # crashed later (example ids hash the UTF-8 bytes) with UnicodeEncodeError. Pairs are joined.
        joined = join_surrogates(value)
        if joined is None:
            raise fail(
                f"{where} has a \\u escape that is half of a UTF-16 surrogate pair",
                key,
                "escape a character outside the BMP as a pair (\\ud83d\\ude00), or write it as UTF-8",
            )
        return joined

    if "text" in keys:
        return Section("prose", shown, n, heldout, text=text("text", row["text"], "'text'"))
    if "prompt" in keys:
        qa = QA(text("prompt", row["prompt"], "'prompt'"), text("completion", row["completion"], "'completion'"), n)
        return Section("instruction", shown, n, heldout, pairs=(qa,))
    return _messages(row["messages"], shown, n, heldout, fail, text)


def _messages(messages: Any, shown: str, n: int, heldout: bool, fail: Any, text: Any) -> Section:
    hint = "messages: an optional system message, then user / assistant turns in pairs"
    if not isinstance(messages, list) or not messages:
        raise fail("'messages' must be a non-empty list of {role, content} objects", "messages", hint)
    turns = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise fail(f"messages[{j}] must be an object with exactly 'role' and 'content'", "messages", hint)
        if m["role"] not in ROLES:
            raise fail(
                f"messages[{j}] has unknown role {m['role']!r}", "messages", "roles are system, user and assistant"
            )
        turns.append((m["role"], text("messages", m["content"], f"messages[{j}].content")))
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    offset = 1 if system is not None else 0
    for j, (role, _) in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            article = "an" if expected == "assistant" else "a"
            raise fail(
                f"messages[{j + offset}] is a {role} message where {article} {expected} message belongs",
                "messages",
                hint,
            )
    if not turns or len(turns) % 2:
        raise fail("the conversation does not end with an assistant reply", "messages", hint)
    pairs = tuple(QA(turns[k][1], turns[k + 1][1], n) for k in range(0, len(turns), 2))
    # Several exchanges are one conversation: later turns train with the earlier ones as context.
    return Section("instruction", shown, n, heldout, pairs=pairs, system=system, conversation=len(pairs) > 1)


def _first(line: str) -> int:
    return len(line) - len(line.lstrip()) + 1


def read_doc(path: str | Path, collect: bool = False) -> Doc:
    """Read a document or spec from disk, plus the data files its `data:` key names (`collect`: see parse_doc)."""
    shown = str(path)
    return add_data(parse_doc(decode(read_bytes(Path(path), shown, MAX_BYTES), shown), shown, collect))
