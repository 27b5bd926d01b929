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
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from dlm.doc.frontmatter import read_yaml
from dlm.doc.text import Position, check_text, normalise
from dlm.errors import DlmError, DlmErrors

SectionKind = Literal["prose", "instruction", "preference"]


KINDS: tuple[SectionKind, ...] = ("prose", "instruction", "preference")
HEADERS = {"instruction": ("Q", "A"), "preference": ("Prompt", "Chosen", "Rejected")}
_LOOKALIKE = {
    "q": "Q",
    "question": "Q",
    "a": "A",
    "answer": "A",
    "prompt": "Prompt",
    "chosen": "Chosen",
    "rejected": "Rejected",
}
_FENCE = re.compile(r"::(prose|instruction|preference)(?:[ \t]+(heldout))?::")
_HEADER = re.compile(r"###[ \t]+(Q|A|Prompt|Chosen|Rejected)")
# DocumentLanguageModel's marks (docs/format.md, "Coming from DocumentLanguageModel"): `### Q !probe`
# pins the pair to the held-out set; its provenance comments are bookkeeping, never training text.
_PROBE = re.compile(r"###[ \t]+Q[ \t]+!probe")
_PROVENANCE = re.compile(r"[ \t]*<!--[ \t]*dlm-auto-(?:harvest|mined|synth):.*-->[ \t]*")
_MEDIA = {
    "image": "dlm trains text only: describe the image in prose, or leave it out",
    "audio": "dlm trains text only: put the transcript in a ::prose:: section or a ### Q / ### A pair",
}
_HEADER_LIKE = re.compile(r"#{1,6}[ \t]*([A-Za-z]+)[ \t]*:?")
_CODE_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
FENCE_HINT = (
    "fences are ::prose::, ::instruction:: and ::preference::, optionally with ' heldout' (::instruction heldout::)"
)


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
    conversation: bool = False  # a multi-turn `messages` row: its pairs are one conversation, trained whole


@dataclass(frozen=True)
class SourceRead:
    """What one `training.sources` item contributed (`dlm.doc.sources`)."""

    path: str  # as the document wrote it
    files: tuple[str, ...]  # the files read, as their sections' `path`
    skipped: tuple[tuple[str, int], ...]  # (why, how many): binary, not UTF-8, too large, past max_files, empty


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
    # parse_doc(collect=True): the YAML and body errors found, for `schema.check_doc` to report with
    # the schema's; `yaml_ok` False means the frontmatter could not be read (so it is not validated)
    problems: tuple[DlmError, ...] = ()
    yaml_ok: bool = True
    sources: tuple[SourceRead, ...] = ()  # `training.sources`, read


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
    inner = stripped[2:-2]
    media = re.match(r"(image|audio)\b", inner)
    if media:
        raise DlmError(
            f"{media[1]} sections ({stripped[:40]!r}) are not supported",
            _MEDIA[media[1]] + "; see 'Coming from DocumentLanguageModel' in docs/format.md",
            path,
            line,
            _indent(raw),
        )
    named = re.fullmatch(r"(prose|instruction|preference)#(\w+)", inner)
    if named:
        raise DlmError(
            f"named adapters are not supported: the '#{named[2]}' suffix of {stripped!r}",
            f"dlm trains one adapter per document: write '::{named[1]}::', and put each adapter's sections "
            "in a document of its own",
            path,
            line,
            _indent(raw),
        )
    words = inner.split()
    kind = next(iter(difflib.get_close_matches(words[0].lower(), KINDS, 1, 0.6)), None) if words else None
    held = any(
        w.lower() in ("held-out", "held_out", "holdout") or difflib.get_close_matches(w.lower(), ["heldout"], 1, 0.7)
        for w in words[1:]
    )
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
        raise DlmError(
            f"'### {m[1]}' belongs in a ::{other}:: section, not in ::{kind}::",
            f"::{kind}:: sections use " + " / ".join(f"### {h}" for h in HEADERS[kind]),
            path,
            line,
            _indent(raw),
        )
    m = _HEADER_LIKE.fullmatch(stripped)
    if m and m[1].lower() in _LOOKALIKE:
        raise DlmError(
            f"{stripped!r} is not a section header",
            f"did you mean '### {_LOOKALIKE[m[1].lower()]}'? headers are exactly "
            + ", ".join(f"'### {h}'" for h in HEADERS[kind]),
            path,
            line,
            _indent(raw),
        )
    return None


def _items(
    kind: SectionKind, buf: list[tuple[int, str, bool]], path: str, fence_line: int
) -> tuple[list[list[tuple[str, int, str]]], set[int]]:
    """Split a section's lines into items: each a list of (header, header line, text), checked."""
    order = HEADERS[kind]
    shape = f"each item is {' / '.join('### ' + h for h in order)}, in that order"
    items: list[list[tuple[str, int, list[str]]]] = []
    probes: set[int] = set()  # lines of `### Q !probe` headers

    def missing(item: list) -> DlmError:
        return DlmError(f"this '### {order[0]}' has no '### {order[len(item)]}'", shape, path, item[0][1], 1)

    for line, raw, inert in buf:
        probe = not inert and kind == "instruction" and _PROBE.fullmatch(raw.strip()) is not None
        name = "Q" if probe else None if inert else _header(raw, kind, path, line)
        if probe:
            probes.add(line)
        if name is None:
            if items:
                items[-1][-1][2].append(raw)
            elif raw.strip():
                raise DlmError(
                    f"text before the first '### {order[0]}' of an ::{kind}:: section",
                    f"start the item with '### {order[0]}'; put free text in a ::prose:: section",
                    path,
                    line,
                    _indent(raw),
                )
            continue
        item = items[-1] if items else None
        if name == order[0]:
            if item is not None and len(item) < len(order):
                raise missing(item)
            items.append([(name, line, [])])
        elif item is None or len(item) == len(order):
            raise DlmError(f"'### {name}' without a '### {order[0]}' before it", shape, path, line, _indent(raw))
        elif name != order[len(item)]:
            raise DlmError(
                f"expected '### {order[len(item)]}' here, found '### {name}'", shape, path, line, _indent(raw)
            )
        else:
            item.append((name, line, []))
    if not items:
        raise DlmError(
            f"empty ::{kind}:: section",
            f"add {' / '.join('### ' + h for h in order)} items under the fence, or remove it",
            path,
            fence_line,
            1,
        )
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
    return checked, probes


def _section(kind: SectionKind, heldout: bool, line: int, buf: list[tuple[int, str, bool]], path: str) -> list[Section]:
    if kind == "prose":
        text = _block([raw for _, raw, _ in buf])
        return [Section("prose", path, line, heldout, text=text)] if text else []
    items, probes = _items(kind, buf, path, line)
    if kind == "instruction":
        pairs = [QA(q[2], a[2], q[1]) for q, a in items]
        if heldout or not probes:
            return [Section("instruction", path, line, heldout, pairs=tuple(pairs))]
        # `### Q !probe` pairs are pinned to the held-out set: runs of them become held-out sections
        runs: list[Section] = []
        for pair in pairs:
            pinned = pair.line in probes
            if runs and runs[-1].heldout == pinned:
                runs[-1] = replace(runs[-1], pairs=(*runs[-1].pairs, pair))
            else:
                runs.append(Section("instruction", path, line, pinned, pairs=(pair,)))
        return runs
    triples = tuple(Triple(p[2], c[2], r[2], p[1]) for p, c, r in items)
    return [Section("preference", path, line, heldout, triples=triples)]


def parse_body(
    lines: list[str], first_line: int, path: str, problems: list[DlmError] | None = None
) -> tuple[Section, ...]:
    """Body lines (the first is file line `first_line`) -> sections, checked.

    A bad section does not stop the reading: its error is recorded and the next fence starts afresh,
    so one run reports every section's problem. They are raised together at the end, or appended to
    `problems` when the caller collects errors of several layers (`schema.check_doc`)."""
    errors: list[DlmError] = []
    sections: list[Section] = []
    kind: SectionKind | None = "prose"  # None: inside a section whose fence was refused (skipped)
    heldout, start = False, first_line
    buf: list[tuple[int, str, bool]] = []  # (line, text, inside a code block)
    code: tuple[str, int, int] | None = None  # the open code block: fence char, length, line

    def close() -> None:
        if kind is None:
            return
        try:
            sections.extend(_section(kind, heldout, start, buf, path))
        except DlmError as exc:
            errors.append(exc)

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
            close()
            try:
                kind, heldout = _fence(raw, path, line)
            except DlmError as exc:
                errors.append(exc)
                kind = None
            start, buf = line, []
            continue
        if _PROVENANCE.fullmatch(raw):
            continue  # DocumentLanguageModel's provenance marker: not training text
        buf.append((line, raw, False))
    if code is not None:
        errors.append(
            DlmError(
                f"code block opened with {code[0] * code[1]} is never closed",
                f"close it with a line of at least {code[1]} '{code[0]}' characters",
                path,
                code[2],
                1,
            )
        )
    else:
        close()
    if problems is not None:
        problems.extend(errors)
    elif len(errors) == 1:
        raise errors[0]
    elif errors:
        raise DlmErrors(errors)
    return tuple(sections)


# ---------------------------------------------------------------- documents


def parse_doc(text: str, path: str = "<string>", collect: bool = False) -> Doc:
    """A `.dlm` document (or, when `path` ends in .yaml/.yml, a standalone spec) -> Doc.

    `collect`: errors in the frontmatter's YAML and in the body are kept in `Doc.problems` (both
    layers read on) instead of raised; a file that has no frontmatter at all still raises."""
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
        raise DlmError(
            "the frontmatter opened on line 1 is never closed",
            "add a line with exactly '---' after the last frontmatter key",
            path,
            1,
            1,
        )
    problems: list[DlmError] | None = [] if collect else None
    yaml_ok = True
    try:
        frontmatter, positions = read_yaml("\n".join(lines[1:close]) + "\n", path, 2)
    except DlmError as exc:
        if problems is None:
            raise
        problems.append(exc)
        frontmatter, positions, yaml_ok = {}, {(): (1, 1)}, False
    sections = parse_body(lines[close + 1 :], close + 2, path, problems)
    return Doc(
        path,
        frontmatter,
        positions,
        sections,
        sha,
        close + 2,
        text=text,
        problems=tuple(problems or ()),
        yaml_ok=yaml_ok,
    )
