"""Sections -> examples -> the deterministic held-out split and the corpus's numbers. Pure text work.

Each example's id is a hash of its kind and text, and whether it is held out is a function of
(id, `training.split_seed`) and of how many examples of its kind there are, never of the training
`seed`: twins that differ only in their seed hold out the same examples, and adding examples rarely
reshuffles the existing ones. Versions trained before issue 15 drew the split from the training seed;
`legacy_split` reproduces that draw for them (docs/compare.md, "The held-out set"). Token counts come from outside (`dlm.plan.tokens`, with the base's tokenizer); without
them each example's length is estimated from its characters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from dlm.doc.grammar import Doc, Section, SourceRead

ExampleKind = Literal["prose", "instruction", "preference"]
# Prose is cut at headings and blank lines into pieces of about this many characters, independent
# of sequence_len, so example ids (and the split) survive a change of knobs.
PROSE_CHUNK_CHARS = 1500
# Planner's token estimate without a tokenizer: English BPE averages ~4 characters a token; 3.5
# errs long. Other scripts are counted by their UTF-8 bytes: a byte-level BPE never makes more
# tokens than bytes, and SmolLM2 makes ~1.8 bytes a token of Chinese, Japanese, Cyrillic or emoji
# (120 tokens for 219 bytes of Chinese); 1.75 errs long. Chat-template tokens per instruction
# example are counted separately.
CHARS_PER_TOKEN = 3.5
NON_ASCII_BYTES_PER_TOKEN = 1.75
TEMPLATE_TOKENS = 24
# A kind of example holds any out only when its share, n x eval_fraction, comes to at least half an
# example (5 or more at the default 0.1): rounding that share to a whole number never gives 0.
MIN_HELDOUT_SHARE = 0.5


def estimate_tokens(text: str) -> float:
    """Tokens of `text` without a tokenizer: ASCII at 3.5 characters a token, the rest by UTF-8 bytes."""
    non_ascii = sum(len(c.encode("utf-8")) for c in text if ord(c) > 127)
    return (len(text) - sum(ord(c) > 127 for c in text)) / CHARS_PER_TOKEN + non_ascii / NON_ASCII_BYTES_PER_TOKEN


@dataclass(frozen=True)
class Example:
    id: str
    kind: ExampleKind
    source: str
    line: int
    text: str = ""  # prose
    prompt: str = ""  # instruction / preference
    completion: str = ""  # answer / chosen
    rejected: str = ""  # preference only (objective sft trains on the chosen answer; dpo on the pair)
    system: str | None = None
    pinned_heldout: bool = False
    # A multi-turn conversation's earlier exchanges, (question, answer) in order; `prompt` and
    # `completion` are its last. The whole conversation is one training row (dlm.plan.chat).
    history: tuple[tuple[str, str], ...] = ()

    @property
    def est_tokens(self) -> int:
        extra = TEMPLATE_TOKENS * (1 + len(self.history)) if self.kind != "prose" else 1
        earlier = "".join(q + a for q, a in self.history)
        return int(estimate_tokens(earlier + self.text + self.prompt + self.completion)) + extra

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class CorpusStats:
    n_train: int
    n_heldout: int
    train_tokens: int  # training examples' tokens: exact when `exact`, else estimated (est_tokens)
    max_tokens: int  # the longest example, training or held-out (both are cut at sequence_len)
    n_prose: int
    n_instruction: int
    exact: bool = False  # counted with the base's own tokenizer, as training tokenises them
    counted_with: str = ""  # the base whose tokenizer counted (exact), or why the counts are estimated
    lengths: tuple[tuple[int, str], ...] = ()  # (tokens, "path:line") per example, training then held-out
    n_pinned: int = 0  # held-out examples from pinned `heldout` sections (then nothing else is held out)
    kept_whole: tuple[tuple[str, int], ...] = ()  # (kind, n): too few of that kind to hold any out
    sources: tuple[tuple[str, int, int], ...] = ()  # `training.sources`: (path, files read, their tokens)
    skipped: tuple[tuple[str, str, int], ...] = ()  # (source path, why, files): binary, not UTF-8, ...
    n_preference: int = 0  # training preference triples (counted in n_instruction too)
    n_headings: int = 0  # training prose pieces that are headings only (a title): no SFT material on their own
    n_preference_heldout: int = 0

    @property
    def mean_tokens(self) -> float:
        return self.train_tokens / self.n_train if self.n_train else 0.0

    @property
    def counted(self) -> str:
        """How the token counts were made, for reasons and headers."""
        if self.exact:
            return f"counted with {self.counted_with}'s tokenizer"
        return "estimated" + (f": {self.counted_with}" if self.counted_with else "")


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
        if s.conversation:  # one example; a one-exchange row is an ordinary pair (and keeps its id)
            parts = [text for p in s.pairs for text in (p.question, p.answer)]
            last = s.pairs[-1]
            history = tuple((p.question, p.answer) for p in s.pairs[:-1])
            return [
                Example(
                    _id("instruction", sys_prompt or "", *parts),
                    "instruction",
                    s.path,
                    s.line,
                    prompt=last.question,
                    completion=last.answer,
                    system=sys_prompt,
                    pinned_heldout=s.heldout,
                    history=history,
                )
            ]
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


def headings_only(e: Example) -> bool:
    """A prose piece of nothing but headings (a document's title): trains nothing worth a phase."""
    return e.kind == "prose" and all(line.lstrip().startswith("#") for line in e.text.splitlines() if line.strip())


def _unit(key: str, ex_id: str) -> float:
    digest = hashlib.sha256(f"{key}:{ex_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_key(split_seed: int | None) -> str:
    """The salt of the content hash that draws the held-out set: fixed unless `training.split_seed`."""
    return "heldout" if split_seed is None else f"heldout/{split_seed}"


def _holds_out(n: int, eval_fraction: float) -> bool:
    """Whether a kind with `n` examples gives any to the held-out set: it keeps at least one to train
    on, and its share n x eval_fraction comes to at least half an example."""
    return n >= 2 and n * eval_fraction >= MIN_HELDOUT_SHARE - 1e-9


def kept_whole(exs: tuple[Example, ...], eval_fraction: float) -> tuple[tuple[str, int], ...]:
    """(kind, n) of each kind that `split` trains on whole because it has too few examples to hold
    any out (empty when pinned sections are the held-out set, or the fraction is 0)."""
    if eval_fraction <= 0 or any(e.pinned_heldout for e in exs):
        return ()
    counts: dict[str, int] = {}
    for e in exs:
        counts[e.kind] = counts.get(e.kind, 0) + 1
    return tuple((k, n) for k, n in counts.items() if not _holds_out(n, eval_fraction))


def split(
    exs: tuple[Example, ...], split_seed: int | None, eval_fraction: float
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, heldout), in source order; `split_seed` is `training.split_seed` (None: the default draw).

    - Pinned sections (`::instruction heldout::`, `"heldout": true`) are the held-out set when there
      are any: nothing else is drawn, as trainers do when given an explicit validation set.
    - Otherwise each kind (prose, instruction, preference) is split on its own, so no kind is left
      with nothing to train on: an example is held out when its (split_seed, id) hash falls below
      `eval_fraction`; a kind whose share comes to half an example or more holds out at least one
      (the lowest hash) and never all (the highest stays); a kind with fewer examples holds none out
      (`kept_whole`, the `heldout-too-few` finding)."""
    return _split(exs, split_key(split_seed), eval_fraction)


def legacy_split(
    exs: tuple[Example, ...], training_seed: int, eval_fraction: float
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """The split versions recorded without a `split` entry were trained on: the same rule, salted
    with the training seed. Only for reading such versions back (`dlm compare`), never for training."""
    return _split(exs, str(training_seed), eval_fraction)


def _split(exs: tuple[Example, ...], key: str, eval_fraction: float) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    if any(e.pinned_heldout for e in exs):
        held = {e.id for e in exs if e.pinned_heldout}
    else:
        held = set()
        for kind in ("prose", "instruction", "preference"):
            group = [e for e in exs if e.kind == kind]
            if eval_fraction <= 0 or not _holds_out(len(group), eval_fraction):
                continue
            ranked = sorted(group, key=lambda e: _unit(key, e.id))
            drawn = [e for e in ranked[:-1] if _unit(key, e.id) < eval_fraction] or ranked[:1]
            held |= {e.id for e in drawn}
    return tuple(e for e in exs if e.id not in held), tuple(e for e in exs if e.id in held)


def stats(
    train: tuple[Example, ...],
    heldout: tuple[Example, ...],
    *,
    eval_fraction: float = 0.0,
    counts: Mapping[str, int] | None = None,
    counted_with: str = "",
    sources: tuple[SourceRead, ...] = (),
) -> CorpusStats:
    """The corpus's numbers. `counts` (example id -> tokens, from `dlm.plan.tokens`) makes them exact;
    `counted_with` names the base whose tokenizer counted, or says why they are estimated."""

    def tokens(e: Example) -> int:
        return counts[e.id] if counts is not None else e.est_tokens

    every = train + heldout
    return CorpusStats(
        n_train=len(train),
        n_heldout=len(heldout),
        train_tokens=sum(tokens(e) for e in train),
        max_tokens=max((tokens(e) for e in every), default=0),
        n_prose=sum(e.kind == "prose" for e in train),
        n_instruction=sum(e.kind != "prose" for e in train),
        exact=counts is not None,
        counted_with=counted_with,
        lengths=tuple((tokens(e), e.where) for e in every),
        n_pinned=sum(e.pinned_heldout for e in heldout),
        kept_whole=kept_whole(every, eval_fraction),
        sources=tuple(
            (r.path, len(r.files), sum(tokens(e) for e in every if e.source in set(r.files))) for r in sources
        ),
        skipped=tuple((r.path, why, n) for r in sources for why, n in r.skipped),
        n_preference=sum(e.kind == "preference" for e in train),
        n_headings=sum(headings_only(e) for e in train),
        n_preference_heldout=sum(e.kind == "preference" for e in heldout),
    )
