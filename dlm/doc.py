"""Text -> Doc: the `.dlm` grammar and standalone `.yaml` specs, with every source position kept.

`parse_doc(text, path)` is pure; `read_doc(path)` is the module's only I/O (the file itself and the
local files its `data:` key names). Positions are 1-based (line, col) and point at the offending
key, list item or section header, never just at the frontmatter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dlm.errors import DlmError

SectionKind = Literal["prose", "instruction", "preference"]
Position = tuple[int, int]


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
    line: int


@dataclass(frozen=True)
class Section:
    kind: SectionKind
    path: str  # the file it came from (the document, or a data file)
    line: int  # its fence line (1 for the implicit leading prose; the row for .jsonl)
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


def parse_doc(text: str, path: str = "<string>") -> Doc:
    raise NotImplementedError


def read_doc(path: str | Path) -> Doc:
    raise NotImplementedError
