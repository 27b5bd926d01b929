"""Did the adapter learn the document? Greedy answers scored against the document's own answers.

After a run, up to `training.report` training Q/A pairs (sampled with the seed) and every held-out
one are answered greedily by the adapter and by the base (the same model with the adapter switched
off), rendered through the chat template exactly as in training. Each answer is scored against the
document's answer the way SQuAD scores reading comprehension: both texts are normalised (lower
case, punctuation and the articles a/an/the dropped, whitespace collapsed), then exact match (the
token lists are equal) and token F1 (harmonic mean of the precision and recall of the shared
tokens). A training answer counts as learned when its F1 is at least `LEARNED_F1`.

A multi-turn conversation is one question: its last, asked after the earlier turns (the document's
own questions and answers) exactly as training laid them out, and scored against its last answer.

Scoring is pure; generation imports torch inside functions. Nothing here prints.
"""

from __future__ import annotations

import collections
import math
import random
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dlm.plan.corpus import Example
from dlm.train.rows import question_head

LEARNED_F1 = 0.8  # a training answer with at least this F1 carries the document's fact
MAX_NEW_TOKENS_CAP = 160  # answers are generated up to ~1.5x the longest expected answer, at most this
_PUNCT = set(string.punctuation) | {"\u2019", "\u2018", "\u201c", "\u201d", "\u3002", "\uff0c"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> list[str]:
    """SQuAD's normalisation: lower case, no punctuation, no articles, split on whitespace."""
    text = "".join(" " if ch in _PUNCT else ch for ch in text.lower())
    return _ARTICLES.sub(" ", text).split()


def exact_match(prediction: str, truth: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(truth)


def token_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised texts (1.0 when both are empty)."""
    pred, gold = normalise_answer(prediction), normalise_answer(truth)
    if not pred or not gold:
        return float(pred == gold)
    shared = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred), shared / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Answer:
    id: str
    source: str  # path:line of the question in the document
    question: str
    expected: str
    adapter: str
    base: str
    f1: float
    base_f1: float
    exact: bool
    base_exact: bool


@dataclass(frozen=True)
class PartScore:
    """One part (training sample or held-out set): counts and means, adapter and base."""

    n: int
    learned: int  # answers with F1 >= LEARNED_F1
    exact: int
    f1: float | None
    base_learned: int
    base_exact: int
    base_f1: float | None


@dataclass(frozen=True)
class LearningReport:
    train: PartScore
    heldout: PartScore
    heldout_loss: float | None
    base_heldout_loss: float | None
    sampled_from: int  # training Q/A pairs in the document (the sample is at most `report`)
    answers: tuple[Answer, ...] = field(default_factory=tuple)

    @property
    def heldout_perplexity(self) -> float | None:
        return perplexity(self.heldout_loss)

    @property
    def base_heldout_perplexity(self) -> float | None:
        return perplexity(self.base_heldout_loss)

    def line(self) -> str:
        return summary_line(self)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["answers"] = [asdict(a) for a in self.answers]
        data["heldout_perplexity"] = self.heldout_perplexity
        data["base_heldout_perplexity"] = self.base_heldout_perplexity
        data["line"] = self.line()
        return data


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss) or loss > 50:
        return None
    return math.exp(loss)


def score_part(answers: Sequence[Answer]) -> PartScore:
    n = len(answers)

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return PartScore(
        n=n,
        learned=sum(a.f1 >= LEARNED_F1 for a in answers),
        exact=sum(a.exact for a in answers),
        f1=mean([a.f1 for a in answers]),
        base_learned=sum(a.base_f1 >= LEARNED_F1 for a in answers),
        base_exact=sum(a.base_exact for a in answers),
        base_f1=mean([a.base_f1 for a in answers]),
    )


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def summary_line(r: LearningReport) -> str:
    """`learned: 19/20 training answers (F1 0.93, base 0.12); held-out F1 0.41 (base 0.18)`."""
    parts = []
    if r.train.n:
        parts.append(
            f"learned: {r.train.learned}/{r.train.n} training answers (F1 {_f(r.train.f1)}, base {_f(r.train.base_f1)})"
        )
    else:
        parts.append("learned: no training Q/A to ask")
    if r.heldout.n:
        parts.append(f"held-out F1 {_f(r.heldout.f1)} (base {_f(r.heldout.base_f1)})")
    if r.heldout_loss is not None:
        ppl, base_ppl = r.heldout_perplexity, r.base_heldout_perplexity
        parts.append(
            f"held-out loss {r.heldout_loss:.3f}"
            + (f" (base {r.base_heldout_loss:.3f})" if r.base_heldout_loss is not None else "")
            + (f", perplexity {ppl:.1f}" if ppl is not None else "")
            + (f" (base {base_ppl:.1f})" if base_ppl is not None else "")
        )
    return "; ".join(parts)


def sample_questions(train: Sequence[Example], n: int, seed: int) -> list[Example]:
    """Up to `n` training Q/A pairs (instruction and preference prompts), drawn with the seed, in
    document order. Prose has no question to ask."""
    qa = [e for e in train if e.kind != "prose" and e.prompt and e.completion]
    if len(qa) <= n:
        return qa
    keep = set(random.Random(seed).sample(range(len(qa)), n))
    return [e for i, e in enumerate(qa) if i in keep]


def greedy_answers(
    model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 16, max_new_tokens: int = 64
) -> list[str]:
    """Greedy answers to the examples' prompts, rendered through the chat template as in training,
    batched with left padding (each row's answer is independent of its batch neighbours)."""
    import torch

    if not examples:
        return []
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            heads = [question_head(tokenizer, e) for e in batch]
            enc = tokenizer(text=heads, return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    use_cache=True,  # the trainer turned the model's cache off; without it every token re-reads the prompt
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            width = enc["input_ids"].shape[1]
            out += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in gen]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def answer_budget(tokenizer: Any, examples: Sequence[Example]) -> int:
    """New tokens to allow: 1.5x the longest expected answer plus a little, capped."""
    longest = max((len(tokenizer(text=e.completion)["input_ids"]) for e in examples), default=16)
    return min(MAX_NEW_TOKENS_CAP, int(longest * 1.5) + 8)


def learning_report(
    model: Any,
    tokenizer: Any,
    train: Sequence[Example],
    heldout: Sequence[Example],
    *,
    sample: int,
    seed: int,
    heldout_loss: float | None,
    base_heldout_loss: float | None,
) -> LearningReport:
    """Answer a seeded sample of the training questions and every held-out one, with the adapter and
    with the base (`disable_adapter()` on the same model), and score both against the document."""
    asked_train = sample_questions(train, sample, seed)
    asked_held = [e for e in heldout if e.kind != "prose" and e.prompt and e.completion]
    asked = asked_train + asked_held
    budget = answer_budget(tokenizer, asked) if asked else 0
    adapter = greedy_answers(model, tokenizer, asked, max_new_tokens=budget)
    with model.disable_adapter():
        base = greedy_answers(model, tokenizer, asked, max_new_tokens=budget)
    answers = [
        Answer(
            id=e.id,
            source=f"{e.source}:{e.line}",
            question=e.prompt,
            expected=e.completion,
            adapter=a,
            base=b,
            f1=round(token_f1(a, e.completion), 4),
            base_f1=round(token_f1(b, e.completion), 4),
            exact=exact_match(a, e.completion),
            base_exact=exact_match(b, e.completion),
        )
        for e, a, b in zip(asked, adapter, base)
    ]
    n_train = len(asked_train)
    return LearningReport(
        train=score_part(answers[:n_train]),
        heldout=score_part(answers[n_train:]),
        heldout_loss=heldout_loss,
        base_heldout_loss=base_heldout_loss,
        sampled_from=sum(e.kind != "prose" for e in train),
        answers=tuple(answers),
    )
