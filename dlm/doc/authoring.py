"""Writing documents: the `dlm init` scaffold and `dlm twin` copies. Pure text in, text out.

A twin keeps the original's text, comments and layout; only the `dlm_id` value and the overridden
values change, edited in place on their own lines, and the result is validated before it is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from dlm.doc.grammar import Doc
from dlm.errors import DlmError

SCAFFOLD = """\
---
dlm_id: {dlm_id}   # ties this file to its store; `dlm twin` makes a copy with a new one
dlm_version: 1
base_model: {base}   # alias, Hugging Face id (org/name), local folder or .gguf file
system_prompt: You are a concise, accurate assistant.
training:
  adapter: {adapter}   # lora | qlora | dora
  lora_r: 8   # rank of the update; DoRA's edge is at low rank
  lora_alpha: 16   # scale = alpha / r = 2
  lora_dropout: 0.0   # 0 keeps DoRA on PEFT's fast path
  seed: 42
  # Left out on purpose, so the measured defaults apply (docs/learning.md): target_modules (all-linear),
  # learning_rate (1e-3) and num_epochs (the planner's budget: enough passes to learn the document,
  # within a time budget; `dlm doctor` shows the choice and why). Write any of them to choose yourself.
---
# {title}

Prose here trains as continued pre-training: the loss covers every token.

::instruction::
### Q
What does this document teach?
### A
Replace this pair with your own questions and answers; the loss covers the answer only.
"""


def scaffold(dlm_id: str, base: str, adapter: str, title: str) -> str:
    return SCAFFOLD.format(dlm_id=dlm_id, base=base, adapter=adapter, title=title)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`training.adapter=dora` -> (("training", "adapter"), "dora"); the value is read as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not re.fullmatch(r"[A-Za-z_][\w.]*", key.strip()):
        raise DlmError(f"--set {item!r} is not KEY=VALUE", "for example: --set training.adapter=dora")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        value = float(value)
    return tuple(key.strip().split(".")), value


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _replace_value(line: str, col: int, key: str, value: Any) -> str:
    """Swap the value after `key:` on this line, keeping indentation and any trailing comment."""
    start = col - 1 + len(key)
    m = re.match(r"\s*:\s*", line[start:])
    if not m:
        raise DlmError(f"cannot edit the value of '{key}' in place", "edit the file by hand")
    head = line[: start + m.end()]
    rest = line[start + m.end() :]
    comment = re.search(r"\s+#.*$", rest)
    tail = comment.group(0) if comment else ""
    return head + _scalar(value) + tail


def twin(text: str, doc: Doc, new_id: str, overrides: list[tuple[tuple[str, ...], Any]]) -> str:
    """The document's text with a fresh id and each override applied on its key's own line."""
    lines = text.split("\n")
    edits = [(("dlm_id",), new_id), *overrides]
    for keys, value in edits:
        pos = doc.positions.get(keys)
        if pos is None:
            lines = _insert(lines, doc, keys, value)
            continue
        line, col = pos
        current = doc.frontmatter
        for k in keys:
            current = current.get(k) if isinstance(current, dict) else None
        if isinstance(current, (dict, list)) and lines[line - 1].rstrip().endswith(":"):
            raise DlmError(
                f"--set {'.'.join(keys)} replaces only values written on one line",
                "edit the file by hand, or write the value in flow style ([a, b])",
            )
        lines[line - 1] = _replace_value(lines[line - 1], col, keys[-1], value)
    return "\n".join(lines)


def _insert(lines: list[str], doc: Doc, keys: tuple[str, ...], value: Any) -> list[str]:
    """Add a key the document does not have: under its parent mapping, or at the frontmatter's end."""
    if doc.path.endswith((".yaml", ".yml")):
        end = len(lines) if lines[-1] != "" else len(lines) - 1
    else:
        end = doc.body_line - 2  # index of the closing `---` line, as doc.py found it
    if len(keys) == 1:
        return lines[:end] + [f"{keys[0]}: {_scalar(value)}"] + lines[end:]
    parent = keys[:-1]
    if len(parent) > 1:
        raise DlmError(f"--set {'.'.join(keys)}: nesting that deep is not in the schema", "see docs/format.md")
    pos = doc.positions.get(parent)
    if pos is None:
        return lines[:end] + [f"{parent[0]}:", f"  {keys[-1]}: {_scalar(value)}"] + lines[end:]
    line = pos[0]  # insert right after the parent key's line, indented as its first child
    child_indent = "  "
    for probe in lines[line:end]:
        if probe.strip() and not probe.lstrip().startswith("#"):
            child_indent = probe[: len(probe) - len(probe.lstrip())] or "  "
            break
    return lines[:line] + [f"{child_indent}{keys[-1]}: {_scalar(value)}"] + lines[line:]


def make_twin(file: Path, sets: list[str], output: Path | None) -> Path:
    """Copy `file` with a fresh dlm_id and overrides; validate the copy before writing it."""
    from dlm.doc.authoring import parse_override, twin
    from dlm.doc.grammar import parse_doc
    from dlm.doc.schema import load_spec, new_id, parse_spec
    from dlm.fsutil import write_new

    doc, _ = load_spec(file)
    overrides = [parse_override(s) for s in sets]
    if any(keys == ("dlm_id",) for keys, _ in overrides):
        raise DlmError("--set dlm_id is not allowed: a twin always gets a fresh id", "drop that --set")
    text = twin(doc.text, doc, new_id(), overrides)
    if output is None:
        label = "-".join(str(v) for _, v in overrides) or "twin"
        name = f"{file.stem}-{label}{file.suffix}"
        # The default name carries the override's value: `base_model=org/name` or a long
        # system_prompt cannot be one file name (a '/' names a folder; most systems stop at 255 bytes).
        if any(c in name for c in "/\\\0") or len(name.encode("utf-8", "surrogatepass")) > 255 or name.strip() != name:
            raise DlmError(
                f"the value {label[:60]!r}{'...' if len(label) > 60 else ''} cannot be part of a file name",
                f"pass the twin's file name with -o, e.g. `dlm twin {file} --set ... -o {file.stem}-twin{file.suffix}`",
                str(file),
            )
        output = file.with_name(name)
    checked = parse_doc(text, str(output))
    parse_spec(checked.frontmatter, checked.positions, str(output))
    write_new(output, text)
    return output
