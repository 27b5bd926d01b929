"""Text -> Doc: the `.dlm` grammar and standalone `.yaml` specs, with every source position kept.

`parse_doc(text, path)` is pure; `read_doc(path)` is the only I/O (the file itself and the local
files its `data:` key names, both read through `dlm.datafiles`). Positions are 1-based (line, col) and
point at the offending key, list item or section header, never just at the frontmatter.
The grammar is documented in docs/format.md.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dlm.errors import DlmError

SectionKind = Literal["prose", "instruction", "preference"]
Position = tuple[int, int]

MAX_BYTES = 8 * 2**20  # a document is authored text; anything larger is a mistake or an attack
MAX_NODES = 10_000  # YAML values built, aliases counted each time they are expanded
MAX_DEPTH = 20  # nested mappings/lists; the schema itself needs 3

KINDS: tuple[SectionKind, ...] = ("prose", "instruction", "preference")
HEADERS = {"instruction": ("Q", "A"), "preference": ("Prompt", "Chosen", "Rejected")}
_LOOKALIKE = {"q": "Q", "question": "Q", "a": "A", "answer": "A", "prompt": "Prompt",
              "chosen": "Chosen", "rejected": "Rejected"}
_FENCE = re.compile(r"::(prose|instruction|preference)(?:[ \t]+(heldout))?::")
_HEADER = re.compile(r"###[ \t]+(Q|A|Prompt|Chosen|Rejected)")
_HEADER_LIKE = re.compile(r"#{1,6}[ \t]*([A-Za-z]+)[ \t]*:?")
_CODE_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
FENCE_HINT = "fences are ::prose::, ::instruction:: and ::preference::, optionally with ' heldout' (::instruction heldout::)"


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    line: int  # the `### Q` line (or the .jsonl row number)


@dataclass(frozen=True)
class Triple:
    prompt: str
    chosen: str
    rejected: str
    line: int  # the `### Prompt` line


@dataclass(frozen=True)
class Section:
    kind: SectionKind
    path: str  # the file it came from (the document, or a data file)
    line: int  # its fence line (the body's first line for the leading prose; the row for .jsonl)
    heldout: bool = False
    text: str = ""  # prose
    pairs: tuple[QA, ...] = ()  # instruction
    triples: tuple[Triple, ...] = ()  # preference
    system: str | None = None  # a `messages` row's own system prompt


@dataclass(frozen=True)
class Doc:
    path: str
    frontmatter: Mapping[str, Any]
    positions: Mapping[tuple, Position]  # key path, e.g. ("training", "lora_r") or ("data", 0)
    sections: tuple[Section, ...]
    sha256: str  # of the normalised text (BOM stripped, LF line ends) plus data files' bytes
    body_line: int = 1  # first line of the body
    data_files: tuple[str, ...] = field(default_factory=tuple)
    text: str = field(default="", repr=False)  # the normalised text the positions refer to


# ---------------------------------------------------------------- text


def normalise(text: str) -> str:
    """BOM stripped, CRLF and lone CR turned into LF: what positions and hashes refer to."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def line_col(text: str, index: int) -> Position:
    """1-based (line, col) of a character index; lines end at LF only."""
    line = text.count("\n", 0, index) + 1
    return line, index - text.rfind("\n", 0, index)


def check_text(text: str, path: str) -> None:
    """Refuse empty, binary and unencodable text before any grammar runs."""
    if not text.strip():
        raise DlmError("the file is empty", "`dlm init FILE` writes a complete scaffold", path, 1, 1)
    nul = text.find("\0")
    if nul >= 0:
        raise DlmError("binary file (it contains a NUL byte)", "dlm reads UTF-8 text files only", path, *line_col(text, nul))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates can reach parse_doc from Python strings
        raise DlmError("text that cannot be encoded as UTF-8", "remove the stray surrogate character", path, *line_col(text, exc.start)) from None


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader plus one implicit resolver: plain `2e-5` / `1E3` are floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


_YAML_HINTS = (  # PyYAML's problem text -> what usually fixes it
    ("mapping values are not allowed", "quote a value that contains ': ' (key: \"a: b\"), or fix this line's indentation"),
    ("undefined alias", "define the anchor (&name) before an alias (*name) uses it"),
    ("constructor", "dlm reads plain YAML values only: remove the '!' tag"),
    ("cannot start any token", "quote a value that starts with @, `, % or another YAML indicator"),
    ("expected ':'", "each line is `key: value`: check for a missing ':' or an unclosed quote"),
    ("document start", "nothing may follow a '...' end marker in the frontmatter"),
    ("another document", "the frontmatter is a single YAML document: remove the extra '---' or '...' line"),
)


def _yaml_hint(problem: str) -> str:
    default = "check this line's indentation (spaces only) and quoting; see docs/format.md"
    return next((hint for key, hint in _YAML_HINTS if key in problem), default)


class _Yaml:
    """Builds plain Python values from a composed node tree, recording where each key and item is."""

    def __init__(self, src: str, path: str, first_line: int) -> None:
        self.src, self.path, self.first_line = src, path, first_line
        self.positions: dict[tuple, Position] = {(): (1, 1)}
        self.nodes = 0
        self.scalars = yaml.constructor.SafeConstructor()

    def at(self, mark: Any) -> Position:
        line, col = line_col(self.src, min(mark.index, len(self.src)))
        return line + self.first_line - 1, col

    def error(self, message: str, hint: str, mark: Any) -> DlmError:
        return DlmError(message, hint, self.path, *self.at(mark))

    def from_yaml_error(self, exc: yaml.YAMLError) -> DlmError:
        if isinstance(exc, yaml.reader.ReaderError):
            line, col = line_col(self.src, exc.position)
            return DlmError(f"character {exc.character!r} is not allowed in YAML", "remove it or quote the text",
                            self.path, line + self.first_line - 1, col)
        if not isinstance(exc, yaml.MarkedYAMLError):
            return DlmError(f"invalid YAML: {exc}", _yaml_hint(""), self.path, self.first_line, 1)
        problem, mark = exc.problem or exc.context or "invalid YAML", exc.problem_mark or exc.context_mark
        unclosed = "end of stream" in problem or "stream end" in problem or "while parsing a flow" in (exc.context or "")
        if unclosed and exc.context_mark is not None:
            mark = exc.context_mark  # an unclosed quote or bracket: point where it opened
        if mark is None:
            return DlmError(f"invalid YAML: {problem}", _yaml_hint(problem), self.path, self.first_line, 1)
        if "'\\t'" in problem:
            return self.error("a tab where YAML expects spaces", "YAML indents and separates with spaces only; replace the tab", mark)
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        return self.error(f"invalid YAML: {problem}{context}", _yaml_hint(problem), mark)

    def read(self) -> dict[str, Any]:
        try:
            depth = 0  # checked on the event stream first: the composer recurses per level
            for event in yaml.parse(self.src, Loader=_Loader):
                if isinstance(event, yaml.CollectionStartEvent):
                    depth += 1
                    if depth > MAX_DEPTH:
                        raise self.error(f"YAML nested deeper than {MAX_DEPTH} levels", "the schema needs three levels at most", event.start_mark)
                elif isinstance(event, yaml.CollectionEndEvent):
                    depth -= 1
            root = yaml.compose(self.src, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise self.from_yaml_error(exc) from None
        if root is None:  # only comments: let the schema say which keys are missing
            return {}
        if not isinstance(root, yaml.MappingNode):
            shown = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise self.error(f"the frontmatter must be a mapping of keys, not {shown}",
                             "write one `key: value` per line, starting with `dlm_id: ...`", root.start_mark)
        return self.build(root, (), 1)

    def build(self, node: yaml.Node, keys: tuple, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            line, col = self.positions.get(keys[:1], (1, 1))
            what = f"'{keys[0]}'" if keys else "the YAML"
            raise DlmError(f"{what} expands to more than {MAX_NODES:,} values (each alias use is counted)",
                           "this looks like a YAML alias bomb; write the values out instead of nesting aliases",
                           self.path, line, col)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node)
        if depth > MAX_DEPTH:  # reachable only through aliases (the event pass caught plain nesting)
            raise self.error(f"YAML nested deeper than {MAX_DEPTH} levels", "remove the self-referencing alias", node.start_mark)
        if node.tag not in (_MAP, _SEQ):
            raise self.error(f"unsupported YAML tag {node.tag!r}", "use plain mappings and lists", node.start_mark)
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.positions[keys + (i,)] = self.at(item.start_mark)
                out.append(self.build(item, keys + (i,), depth + 1))
            return out
        return self.mapping(node, keys, depth)

    def mapping(self, node: yaml.MappingNode, keys: tuple, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # Merge keys (`<<: *defaults`) first, so explicit keys override them, values and positions alike.
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in reversed(sources):  # the first source listed wins
                    if not isinstance(src, yaml.MappingNode):
                        raise self.error("a merge key (<<) needs a mapping or a list of mappings", "merge an anchored mapping: <<: *name", src.start_mark)
                    out.update(self.build(src, keys, depth + 1))  # counted like any other node
        seen: dict[str, Position] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, pos = self.key(key_node), self.at(key_node.start_mark)
            if key in seen:
                raise DlmError(f"duplicate key '{key}' (first set on line {seen[key][0]})",
                               "remove one of them; YAML would silently keep the last", self.path, *pos)
            seen[key] = pos
            self.positions[keys + (key,)] = pos
            out[key] = self.build(value_node, keys + (key,), depth + 1)
        return out

    def key(self, node: yaml.Node) -> str:
        self.nodes += 1
        if not isinstance(node, yaml.ScalarNode):
            raise self.error("a key must be a plain name, not a list or mapping", "write `name: value`", node.start_mark)
        value = self.scalar(node)
        if value is None:
            raise self.error("a key is missing (nothing before the ':')", "write `name: value`", node.start_mark)
        if not isinstance(value, str):
            hint = f"quote it: '{node.value}': ..."
            if isinstance(value, bool):
                hint += " (YAML 1.1 reads yes/no/on/off as true/false)"
            raise self.error(f"key {node.value!r} is read as {type(value).__name__}, not a name", hint, node.start_mark)
        return value

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            value = self.scalars.construct_object(node)
        except yaml.YAMLError as exc:  # an unknown tag such as !!python/object
            raise self.from_yaml_error(exc) from None
        except (ValueError, TypeError, OverflowError, KeyError, AttributeError, IndexError) as exc:
            # e.g. a date like 2001-13-45, or an explicit tag PyYAML's constructor cannot honour:
            # `!!bool maybe` (KeyError), `!!timestamp x` (AttributeError); found by tests/test_fuzz.py
            raise self.error(f"cannot read the value {node.value!r} as {node.tag.rsplit(':', 1)[-1]}",
                             "quote it to keep it as text, or remove the !! tag", node.start_mark) from None
        # Found by tests/test_fuzz.py: a double-quoted "\ud800" escape builds a lone surrogate, which
        # check_text never sees (the file itself is valid UTF-8) and which crashed later, in hashing,
        # path handling or printing, with UnicodeEncodeError. PyYAML also leaves a JSON-style pair
        # "\ud83d\ude00" as two halves: join pairs into their character, refuse a lone half here.
        if isinstance(value, str):
            value = join_surrogates(value)
            if value is None:
                raise self.error("a \\u escape in this value is half of a UTF-16 surrogate pair, which is not text",
                                 "write the character itself, or escape it whole (\\U0001F600 or the pair \\ud83d\\ude00)",
                                 node.start_mark)
        return value


def join_surrogates(text: str) -> str | None:
    """`text` with surrogate pairs joined into their character; None if a lone surrogate is left."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return None


def read_yaml(src: str, path: str, first_line: int = 1) -> tuple[dict[str, Any], dict[tuple, Position]]:
    """YAML text -> (mapping, positions); `first_line` is the file line the YAML text starts on."""
    reader = _Yaml(src, path, first_line)
    return reader.read(), reader.positions


# ---------------------------------------------------------------- body


def _block(lines: list[str]) -> str:
    """Lines without the blank ones around them; inner blank lines and indentation are kept."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end]).rstrip()


def _indent(raw: str) -> int:
    return len(raw) - len(raw.lstrip()) + 1


def _fence(raw: str, path: str, line: int) -> tuple[SectionKind, bool]:
    stripped = raw.strip()
    m = _FENCE.fullmatch(stripped)
    if m:
        return m[1], bool(m[2])  # type: ignore[return-value]
    words = stripped[2:-2].split()
    kind = (difflib.get_close_matches(words[0].lower(), KINDS, 1, 0.6) or [None])[0] if words else None
    held = any(w.lower() in ("held-out", "held_out", "holdout") or difflib.get_close_matches(w.lower(), ["heldout"], 1, 0.7)
               for w in words[1:])
    if words and words[0] in KINDS and len(words) > 1:
        message = f"unknown marker {' '.join(words[1:])!r} in fence {stripped!r}"
    else:
        message = f"unknown fence {stripped!r}"
    hint = f"did you mean '::{kind}{' heldout' if held else ''}::'? " if kind else ""
    hint += FENCE_HINT + ("" if kind else "; to keep the line as text, put it in a ``` code block")
    raise DlmError(message, hint, path, line, _indent(raw))


def _header(raw: str, kind: str, path: str, line: int) -> str | None:
    """The header name on this line of an instruction/preference section, or None for text."""
    stripped = raw.strip()
    m = _HEADER.fullmatch(stripped)
    if m and m[1] in HEADERS[kind]:
        return m[1]
    if m:
        other = "preference" if kind == "instruction" else "instruction"
        raise DlmError(f"'### {m[1]}' belongs in a ::{other}:: section, not in ::{kind}::",
                       f"::{kind}:: sections use " + " / ".join(f"### {h}" for h in HEADERS[kind]), path, line, _indent(raw))
    m = _HEADER_LIKE.fullmatch(stripped)
    if m and m[1].lower() in _LOOKALIKE:
        raise DlmError(f"{stripped!r} is not a section header",
                       f"did you mean '### {_LOOKALIKE[m[1].lower()]}'? headers are exactly " + ", ".join(f"'### {h}'" for h in HEADERS[kind]),
                       path, line, _indent(raw))
    return None


def _items(kind: SectionKind, buf: list[tuple[int, str, bool]], path: str, fence_line: int) -> list[list[tuple[str, int, str]]]:
    """Split a section's lines into items: each a list of (header, header line, text), checked."""
    order = HEADERS[kind]
    shape = f"each item is {' / '.join('### ' + h for h in order)}, in that order"
    items: list[list[tuple[str, int, list[str]]]] = []

    def missing(item: list) -> DlmError:
        return DlmError(f"this '### {order[0]}' has no '### {order[len(item)]}'", shape, path, item[0][1], 1)

    for line, raw, inert in buf:
        name = None if inert else _header(raw, kind, path, line)
        if name is None:
            if items:
                items[-1][-1][2].append(raw)
            elif raw.strip():
                raise DlmError(f"text before the first '### {order[0]}' of an ::{kind}:: section",
                               f"start the item with '### {order[0]}'; put free text in a ::prose:: section", path, line, _indent(raw))
            continue
        item = items[-1] if items else None
        if name == order[0]:
            if item is not None and len(item) < len(order):
                raise missing(item)
            items.append([(name, line, [])])
        elif item is None or len(item) == len(order):
            raise DlmError(f"'### {name}' without a '### {order[0]}' before it", shape, path, line, _indent(raw))
        elif name != order[len(item)]:
            raise DlmError(f"expected '### {order[len(item)]}' here, found '### {name}'", shape, path, line, _indent(raw))
        else:
            item.append((name, line, []))
    if not items:
        raise DlmError(f"empty ::{kind}:: section", f"add {' / '.join('### ' + h for h in order)} items under the fence, or remove it",
                       path, fence_line, 1)
    if len(items[-1]) < len(order):
        raise missing(items[-1])
    checked = []
    for item in items:
        parts = []
        for name, line, lines in item:
            text = _block(lines)
            if not text:
                raise DlmError(f"empty '### {name}'", f"write the text on the lines under '### {name}'", path, line, 1)
            parts.append((name, line, text))
        checked.append(parts)
    return checked


def _section(kind: SectionKind, heldout: bool, line: int, buf: list[tuple[int, str, bool]], path: str) -> list[Section]:
    if kind == "prose":
        text = _block([raw for _, raw, _ in buf])
        return [Section("prose", path, line, heldout, text=text)] if text else []
    items = _items(kind, buf, path, line)
    if kind == "instruction":
        pairs = tuple(QA(q[2], a[2], q[1]) for q, a in items)
        return [Section("instruction", path, line, heldout, pairs=pairs)]
    triples = tuple(Triple(p[2], c[2], r[2], p[1]) for p, c, r in items)
    return [Section("preference", path, line, heldout, triples=triples)]


def parse_body(lines: list[str], first_line: int, path: str) -> tuple[Section, ...]:
    """Body lines (the first is file line `first_line`) -> sections, checked."""
    sections: list[Section] = []
    kind: SectionKind = "prose"
    heldout, start = False, first_line
    buf: list[tuple[int, str, bool]] = []  # (line, text, inside a code block)
    code: tuple[str, int, int] | None = None  # the open code block: fence char, length, line
    for line, raw in enumerate(lines, first_line):
        m = _CODE_FENCE.fullmatch(raw)
        if code is not None:
            buf.append((line, raw, True))
            if m and m[1][0] == code[0] and len(m[1]) >= code[1] and not m[2].strip():
                code = None
            continue
        # A backtick fence's info string may not hold a backtick (CommonMark): ```x``` is inline code.
        if m and not (m[1][0] == "`" and "`" in m[2]):
            code = (m[1][0], len(m[1]), line)
            buf.append((line, raw, True))
            continue
        stripped = raw.strip()
        if len(stripped) >= 4 and stripped.startswith("::") and stripped.endswith("::"):
            new_kind, new_heldout = _fence(raw, path, line)
            sections += _section(kind, heldout, start, buf, path)
            kind, heldout, start, buf = new_kind, new_heldout, line, []
            continue
        buf.append((line, raw, False))
    if code is not None:
        raise DlmError(f"code block opened with {code[0] * code[1]} is never closed",
                       f"close it with a line of at least {code[1]} '{code[0]}' characters", path, code[2], 1)
    sections += _section(kind, heldout, start, buf, path)
    return tuple(sections)


# ---------------------------------------------------------------- documents


def parse_doc(text: str, path: str = "<string>") -> Doc:
    """A `.dlm` document (or, when `path` ends in .yaml/.yml, a standalone spec) -> Doc."""
    text = normalise(text)
    check_text(text, path)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if path.lower().endswith((".yaml", ".yml")):
        frontmatter, positions = read_yaml(text, path)
        return Doc(path, frontmatter, positions, (), sha, 1, text=text)
    lines = text.split("\n")
    if lines[0].rstrip() != "---":
        hint = "a .dlm file opens with a '---' line, then the YAML frontmatter, then another '---' line"
        if ":" in lines[0]:
            hint += "; a spec without a body is a .yaml file"
        raise DlmError("the first line must be '---' (the frontmatter opens)", hint, path, 1, 1)
    close = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if close is None:
        raise DlmError("the frontmatter opened on line 1 is never closed",
                       "add a line with exactly '---' after the last frontmatter key", path, 1, 1)
    frontmatter, positions = read_yaml("\n".join(lines[1:close]) + "\n", path, 2)
    sections = parse_body(lines[close + 1:], close + 2, path)
    return Doc(path, frontmatter, positions, sections, sha, close + 2, text=text)


def read_doc(path: str | Path) -> Doc:
    """Read a document or spec from disk, plus the data files its `data:` key names."""
    from dlm.datafiles import add_data, decode, read_bytes  # datafiles builds on this module

    shown = str(path)
    return add_data(parse_doc(decode(read_bytes(Path(path), shown, MAX_BYTES), shown), shown))
