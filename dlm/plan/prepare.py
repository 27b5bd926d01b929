"""From a document's path to everything a command needs: doc, spec, base facts, examples, plan.

This is the glue between the pure modules (doc -> schema -> corpus -> plan) and the commands, so
`doctor`, `train`, `prompt` and `compare` all see one and the same plan. It reads files and configs
(and the base's tokenizer, to count tokens) but never loads weights or imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dlm.doc.compat import HUB_PREFIX
from dlm.doc.grammar import Doc
from dlm.doc.schema import Spec, check_doc, raise_all
from dlm.errors import DlmError
from dlm.plan import bases, corpus, tokens
from dlm.plan.bases import BaseFacts
from dlm.plan.corpus import CorpusStats, Example
from dlm.plan.hardware import HardwareFacts
from dlm.plan.planner import Plan, Purpose, make_plan


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
    purpose: Purpose = "train",
    training_overrides: dict | None = None,
    sharding: str = "none",
    home: Path | None = None,
    base_folder: Callable[[BaseFacts], Path] | None = None,
) -> Prepared:
    """Parse, validate, resolve the base, split the corpus, count its tokens and plan. Raises DlmError
    on bad input.

    `training_overrides` replaces `training:` keys as if the document had written them (validated;
    `dlm bench` uses it to plan the same document with other knobs). Token counts are exact (the
    base's own tokenizer, `dlm.plan.tokens`) when `base_folder` makes the base's folder (`dlm train`
    passes `dlm.train.basefolder.materialize`), or when `home` ($DLM_HOME) is given and the base's
    tokenizer is already on disk (`dlm doctor`); otherwise they are estimated and the plan says so."""
    doc, checked, errors = check_doc(path)
    base_name = checked.base_model if checked is not None else doc.frontmatter.get("base_model")
    base: BaseFacts | None = None
    if isinstance(base_name, str) and base_name:  # the base's error joins the document's others
        try:
            base = bases.resolve(base_name.removeprefix(HUB_PREFIX), Path(doc.path).parent)
        except DlmError as exc:
            if exc.line is None:  # point at the document's base_model key, not at nothing
                line, col = doc.positions.get(("base_model",), (1, 1))
                exc = DlmError(exc.message, exc.hint, doc.path, line, col)
            errors.append(exc)
    raise_all(errors)
    assert checked is not None and base is not None
    spec = checked
    if max_steps is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"max_steps": max_steps})})
    if training_overrides:
        from dlm.doc.schema import Training

        written = {**spec.training.model_dump(exclude_unset=True), **training_overrides}
        spec = spec.model_copy(update={"training": Training.model_validate(written)})
    examples = corpus.examples(doc, spec.system_prompt)
    train, heldout = corpus.split(examples, spec.training.split_seed, spec.training.eval_fraction)
    _check_something_trains(doc, train, heldout)
    _check_objective(doc, spec, train)
    counts, why = None, "the base's tokenizer was not looked for"
    if base_folder is not None or home is not None:
        try:
            folder = base_folder(base) if base_folder is not None else None
        except DlmError as exc:  # a base not on disk (`dlm pull` names the way): at the base_model key
            if exc.line is not None or exc.exit_code != 2:
                raise
            line, col = doc.positions.get(("base_model",), (1, 1))
            raise DlmError(exc.message, exc.hint, doc.path, line, col) from None
        counts, why = tokens.count(base, train + heldout, home=home, folder=folder, cache_name=spec.dlm_id)
    stats = corpus.stats(
        train,
        heldout,
        eval_fraction=spec.training.eval_fraction,
        counts=counts,
        counted_with=base.name if counts is not None else why,
        sources=doc.sources,
    )
    plan = make_plan(spec, hardware, base, stats, world_size=world_size, purpose=purpose, sharding=sharding)
    return Prepared(doc, spec, base, train, heldout, stats, hardware, plan)


def _check_something_trains(doc: Doc, train: tuple[Example, ...], heldout: tuple[Example, ...]) -> None:
    """A document with nothing to train on is bad input, at the line that explains it. A title above
    held-out sections is prose too, but training on headings alone would be a silently empty run."""
    pinned = [e for e in heldout if e.pinned_heldout]
    if any(not corpus.headings_only(e) for e in train) or (train and not pinned):
        return
    if not pinned:  # so nothing at all: no example trains, and none was pinned
        raise DlmError(
            "the document has no training examples",
            "write prose below the frontmatter, or an ::instruction:: section with ### Q / ### A pairs",
            doc.path,
            doc.body_line,
            1,
        )
    first = next((s for s in doc.sections if s.heldout), None)
    path, line = (first.path, first.line) if first is not None else (pinned[0].source, pinned[0].line)
    raise DlmError(
        f"every example of the document is held out ({len(pinned)} in `heldout` sections or rows): "
        f"nothing {'but headings ' if train else ''}is left to train on",
        "held-out examples only judge the adapter; write the examples to learn from in sections without "
        "`heldout` (::instruction::, ::prose::), or remove `heldout` from this one",
        path,
        line,
        1,
    )


def _check_objective(doc: Doc, spec: Spec, train: tuple[Example, ...]) -> None:
    """`objective: dpo` needs preference triples to train on; `reference: sft` needs an SFT phase."""
    t = spec.training
    if t.objective != "dpo":
        return
    n_pref = sum(e.kind == "preference" for e in train)
    if n_pref == 0:
        line, col = doc.positions.get(("training", "objective"), (1, 1))
        raise DlmError(
            "'objective': dpo needs preference triples to train on, and this document has none"
            + (" outside held-out sections" if any(s.kind == "preference" for s in doc.sections) else ""),
            "add a ::preference:: section (### Prompt / ### Chosen / ### Rejected), or set objective: sft",
            doc.path,
            line,
            col,
        )
    if t.preference.reference == "sft" and all(e.kind == "preference" or corpus.headings_only(e) for e in train):
        line, col = doc.positions.get(("training", "preference", "reference"), (1, 1))
        raise DlmError(
            "'reference': sft needs an SFT phase, and this document has only preference triples to train on",
            "write reference: base, or add ::instruction:: / prose examples for an SFT phase before DPO",
            doc.path,
            line,
            col,
        )
