"""From a document's path to everything a command needs: doc, spec, base facts, examples, plan.

This is the glue between the pure modules (doc -> schema -> corpus -> plan) and the commands, so
`doctor`, `train`, `prompt` and `compare` all see one and the same plan. It reads files and configs
but never loads weights or imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlm.doc.grammar import Doc
from dlm.doc.schema import Spec, load_spec
from dlm.errors import DlmError
from dlm.plan import bases, corpus
from dlm.plan.bases import BaseFacts
from dlm.plan.corpus import CorpusStats, Example
from dlm.plan.hardware import HardwareFacts
from dlm.plan.planner import Plan, make_plan


@dataclass(frozen=True)
class Prepared:
    doc: Doc
    spec: Spec
    base: BaseFacts
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    corpus: CorpusStats
    hardware: HardwareFacts
    plan: Plan


def prepare(
    path: str | Path,
    hardware: HardwareFacts,
    *,
    world_size: int = 1,
    max_steps: int | None = None,
    purpose: str = "train",
    training_overrides: dict | None = None,
    sharding: str = "none",
) -> Prepared:
    """Parse, validate, resolve the base, split the corpus and plan. Raises DlmError on bad input.

    `training_overrides` replaces `training:` keys as if the document had written them (validated;
    `dlm bench` uses it to plan the same document with other knobs)."""
    doc, spec = load_spec(path)
    if max_steps is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"max_steps": max_steps})})
    if training_overrides:
        from dlm.doc.schema import Training

        written = {**spec.training.model_dump(exclude_unset=True), **training_overrides}
        spec = spec.model_copy(update={"training": Training.model_validate(written)})
    try:
        base = bases.resolve(spec.base_model, Path(doc.path).parent)
    except DlmError as exc:
        if exc.line is None:  # point at the document's base_model key, not at nothing
            line, col = doc.positions.get(("base_model",), (1, 1))
            raise DlmError(exc.message, exc.hint, doc.path, line, col) from None
        raise
    examples = corpus.examples(doc, spec.system_prompt)
    train, heldout = corpus.split(examples, spec.training.seed, spec.training.eval_fraction)
    if not train:
        raise DlmError(
            "the document has no training examples",
            "write prose below the frontmatter, or an ::instruction:: section with ### Q / ### A pairs",
            doc.path,
            doc.body_line,
            1,
        )
    stats = corpus.stats(train, heldout)
    plan = make_plan(spec, hardware, base, stats, world_size=world_size, purpose=purpose, sharding=sharding)
    return Prepared(doc, spec, base, train, heldout, stats, hardware, plan)
