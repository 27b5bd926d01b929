"""Sections -> examples -> the deterministic held-out split. Pure text work: no I/O, no tokenizer.

Each example's id is a hash of its kind and text, and whether it is held out is a function of
(seed, id) alone, so adding examples never reshuffles the existing ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from dlm.doc.grammar import Doc, Section

ExampleKind = Literal["prose", "instruction", "preference"]
# Prose is cut at headings and blank lines into pieces of about this many characters, independent
# of sequence_len, so example ids (and the split) survive a change of knobs.
PROSE_CHUNK_CHARS = 1500
# Planner's token estimate without a tokenizer: English BPE averages ~4 characters a token; 3.5
# errs long. Chat-template tokens per instruction example are counted separately.
CHARS_PER_TOKEN = 3.5
TEMPLATE_TOKENS = 24


@dataclass(frozen=True)
class Example:
    id: str
    kind: ExampleKind
    source: str
    line: int
    text: str = ""  # prose
    prompt: str = ""  # instruction / preference
    completion: str = ""  # answer / chosen
    rejected: str = ""  # preference only (kept for evaluation; SFT trains on the chosen answer)
    system: str | None = None
    pinned_heldout: bool = False

    @property
    def chars(self) -> int:
        return len(self.text) + len(self.prompt) + len(self.completion)

    @property
    def est_tokens(self) -> int:
        extra = TEMPLATE_TOKENS if self.kind != "prose" else 1
        return int(self.chars / CHARS_PER_TOKEN) + extra


@dataclass(frozen=True)
class CorpusStats:
    n_train: int
    n_heldout: int
    train_tokens: int  # estimated, see CHARS_PER_TOKEN
    max_tokens: int  # longest example, estimated
    n_prose: int
    n_instruction: int

    @property
    def mean_tokens(self) -> float:
        return self.train_tokens / self.n_train if self.n_train else 0.0


def _id(kind: str, *parts: str) -> str:
    h = hashlib.sha256(kind.encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()[:16]


def chunk_prose(text: str, limit: int = PROSE_CHUNK_CHARS) -> list[str]:
    """Split prose at headings, then pack paragraphs into pieces of at most ~`limit` characters."""
    blocks = [b.strip() for b in re.split(r"\n\s*\n|\n(?=#{1,6} )", text) if b.strip()]
    chunks: list[str] = []
    has_body = False  # a heading opens a new chunk only once the current one has some text
    for block in blocks:
        heading = block.startswith("#") and "\n" not in block
        fits = bool(chunks) and len(chunks[-1]) + len(block) + 2 <= limit
        if fits and not (heading and has_body):
            chunks[-1] += "\n\n" + block
        else:
            chunks.append(block)
            has_body = False
        has_body = has_body or not heading
    return chunks


def _section_examples(s: Section, system: str | None) -> list[Example]:
    if s.kind == "prose":
        return [
            Example(_id("prose", c), "prose", s.path, s.line, text=c, pinned_heldout=s.heldout)
            for c in chunk_prose(s.text)
        ]
    if s.kind == "instruction":
        sys_prompt = s.system if s.system is not None else system
        return [
            Example(
                _id("instruction", sys_prompt or "", p.question, p.answer),
                "instruction",
                s.path,
                p.line,
                prompt=p.question,
                completion=p.answer,
                system=sys_prompt,
                pinned_heldout=s.heldout,
            )
            for p in s.pairs
        ]
    return [
        Example(
            _id("preference", t.prompt, t.chosen, t.rejected),
            "preference",
            s.path,
            t.line,
            prompt=t.prompt,
            completion=t.chosen,
            rejected=t.rejected,
            system=system,
            pinned_heldout=s.heldout,
        )
        for t in s.triples
    ]


def examples(doc: Doc, system_prompt: str | None = None) -> tuple[Example, ...]:
    """Every example of the document in source order; duplicates (same id) are kept once."""
    seen: set[str] = set()
    out: list[Example] = []
    for s in doc.sections:
        for ex in _section_examples(s, system_prompt):
            if ex.id not in seen:
                seen.add(ex.id)
                out.append(ex)
    return tuple(out)


def _unit(seed: int, ex_id: str) -> float:
    digest = hashlib.sha256(f"{seed}:{ex_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(exs: tuple[Example, ...], seed: int, eval_fraction: float) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, heldout). Held out: pinned sections, plus each example whose (seed, id) hash falls
    below `eval_fraction`. With a fraction > 0 and at least two examples, at least one is held out
    (the lowest hash), so a small document still has something to judge on."""
    if eval_fraction <= 0:
        return tuple(e for e in exs if not e.pinned_heldout), tuple(e for e in exs if e.pinned_heldout)
    held = {e.id for e in exs if e.pinned_heldout or _unit(seed, e.id) < eval_fraction}
    if not held and len(exs) >= 2:
        held = {min(exs, key=lambda e: _unit(seed, e.id)).id}
    if len(held) == len(exs) and exs:  # never hold out everything
        keep = max((e for e in exs if not e.pinned_heldout), key=lambda e: _unit(seed, e.id), default=None)
        if keep is not None:
            held.discard(keep.id)
    return tuple(e for e in exs if e.id not in held), tuple(e for e in exs if e.id in held)


def stats(train: tuple[Example, ...], heldout: tuple[Example, ...]) -> CorpusStats:
    return CorpusStats(
        n_train=len(train),
        n_heldout=len(heldout),
        train_tokens=sum(e.est_tokens for e in train),
        max_tokens=max((e.est_tokens for e in train), default=0),
        n_prose=sum(e.kind == "prose" for e in train),
        n_instruction=sum(e.kind != "prose" for e in train),
    )
