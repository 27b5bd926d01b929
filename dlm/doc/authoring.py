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
from dlm.errors import DlmError, DlmErrors

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


def _scalar(value: Any, flow: bool = False) -> str:
    """`value` as YAML on one line; inside a flow collection (`{...}`, `[...]`), quoted where a comma
    or bracket would otherwise end it."""
    if flow:  # dumped as the only item of a flow list, so the emitter quotes for flow context
        return yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()[1:-1].strip()
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _frontmatter(lines: list[str], doc: Doc) -> tuple[int, int]:
    """(first, end): the frontmatter's line indexes in `lines`, `end` exclusive (a .dlm's closing
    `---`); `lines` may have grown by inserted keys since `doc` was read, all inside the frontmatter."""
    grown = len(lines) - len(doc.text.split("\n"))
    if doc.path.endswith((".yaml", ".yml")):
        return 0, len(lines) if lines[-1] != "" else len(lines) - 1
    return 1, doc.body_line - 2 + grown  # between the `---` lines, as grammar.py found them


def _node(root: yaml.Node | None, keys: tuple[str, ...]) -> tuple[yaml.MappingNode | None, yaml.Node | None]:
    """(the mapping that holds keys[-1], its value node), following keys from the root; None where a
    level is missing. Keys that come only through a merge key (`<<`) count as missing here."""
    parent: yaml.Node | None = root
    for depth, key in enumerate(keys):
        if not isinstance(parent, yaml.MappingNode):
            return None, None
        value = next((v for k, v in parent.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        if depth == len(keys) - 1:
            return parent, value
        parent = value
    return None, None


def twin(text: str, doc: Doc, new_id: str, overrides: list[tuple[tuple[str, ...], Any]]) -> str:
    """The document's text with a fresh id and each override applied where its value is written.

    A value is replaced in its own span, in block style (`key: value  # comment`) and flow style
    (`training: {adapter: lora}`) alike, so comments and layout survive; a key the document lacks is
    added to its parent mapping (as a line, or as `, key: value` inside a flow mapping)."""
    lines = text.split("\n")
    for keys, value in [(("dlm_id",), new_id), *overrides]:
        first, end = _frontmatter(lines, doc)
        root = yaml.compose("\n".join(lines[first:end]) + "\n")
        parent, node = _node(root, keys)
        name = ".".join(keys)
        if node is None and len(keys) > 2 and (keys[:2] != ("training", "preference") or len(keys) > 3):
            raise DlmError(f"--set {name}: nesting that deep is not in the schema", "see docs/format.md")
        if node is None and len(keys) > 2 and parent is None:  # training.preference.X needs its block written
            raise DlmError(
                f"--set {name}: the document has no '{'.'.join(keys[:-1])}' block to add it to",
                f"write `{keys[-2]}:` under {keys[-3]}: by hand first (docs/format.md)",
            )
        if node is not None:
            lines = _replace(lines, first, parent, node, name, value)
        elif parent is not None and parent.flow_style:
            lines = _insert_flow(lines, first, parent, keys[-1], value)
        elif parent is not None:
            lines = _insert(lines, first, end, parent, keys[-1], value)
        elif len(keys) == 2 and _node(root, keys[:1])[1] is not None:
            raise DlmError(
                f"--set {name}: '{keys[0]}' is not written as a mapping in this document",
                f"edit the file by hand: '{keys[0]}' needs `key: value` lines under it",
            )
        else:  # a top-level key, or a section the document lacks: at the frontmatter's end
            add = (
                [f"{keys[0]}: {_scalar(value)}"]
                if len(keys) == 1
                else [f"{keys[0]}:", f"  {keys[1]}: {_scalar(value)}"]
            )
            lines = lines[:end] + add + lines[end:]
    return "\n".join(lines)


def _replace(
    lines: list[str], first: int, parent: yaml.MappingNode | None, node: yaml.Node, name: str, value: Any
) -> list[str]:
    """Swap the value node's own characters for `value`; refuse what is not written on one line."""
    start, stop = node.start_mark, node.end_mark
    one_line = isinstance(node, yaml.ScalarNode) and node.style not in ("|", ">")
    one_line = one_line or (isinstance(node, yaml.CollectionNode) and bool(node.flow_style))
    if not one_line or start.line != stop.line:
        raise DlmError(
            f"--set {name} replaces only values written on one line",
            "edit the file by hand, or write the value in flow style ([a, b])",
        )
    key = next(k for k, v in parent.value if v is node) if parent is not None else None
    if key is not None and (start.line, start.column) < (key.end_mark.line, key.end_mark.column):
        raise DlmError(
            f"--set {name}: its value is a YAML alias (*name) of a value written elsewhere",
            "edit the file by hand, or write the value out instead of the alias",
        )
    i = first + start.line
    row = lines[i]
    new = _scalar(value, flow=bool(parent is not None and parent.flow_style))
    return [*lines[:i], row[: start.column] + new + row[stop.column :], *lines[i + 1 :]]


def _insert_flow(lines: list[str], first: int, parent: yaml.MappingNode, key: str, value: Any) -> list[str]:
    """Add `key: value` before the closing brace of a flow mapping."""
    stop = parent.end_mark  # just after the '}'
    i, col = first + stop.line, stop.column - 1
    row = lines[i]
    item = f"{key}: {_scalar(value, flow=True)}"
    head = row[:col].rstrip()
    sep = "" if head.endswith("{") else ", "
    return [*lines[:i], head + sep + item + row[col:], *lines[i + 1 :]]


def _insert(lines: list[str], first: int, end: int, parent: yaml.MappingNode, key: str, value: Any) -> list[str]:
    """Add `key: value` to a block mapping: as its first line, indented as its other keys (at the
    frontmatter's end for the root mapping, after its last key)."""
    child = parent.value[0][0].start_mark if parent.value else None
    if child is None or child.column == 0:  # the root mapping: at the frontmatter's end
        return lines[:end] + [f"{key}: {_scalar(value)}"] + lines[end:]
    i = first + child.line
    return lines[:i] + [f"{' ' * child.column}{key}: {_scalar(value)}"] + lines[i:]


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
    try:
        checked = parse_doc(text, str(output))
        parse_spec(checked.frontmatter, checked.positions, str(output))
    except DlmError as exc:  # located in the copy, which is not written: say so, point at the original
        problems = exc.errors if isinstance(exc, DlmErrors) else [exc]
        shown = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in problems)
        raise DlmError(
            f"the twin would not be a valid document, so {output} was not written: {shown}",
            problems[0].hint or "check the --set values against docs/format.md",
            str(file),
        ) from None
    write_new(output, text)
    return output
