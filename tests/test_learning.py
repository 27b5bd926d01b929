"""The learning report's scoring (SQuAD-style exact match and token F1), its sample and its line."""

from __future__ import annotations

import pytest

from dlm.plan.corpus import Example
from dlm.train.learning import (
    LEARNED_F1,
    Answer,
    LearningReport,
    exact_match,
    normalise_answer,
    perplexity,
    sample_questions,
    score_part,
    summary_line,
    token_f1,
)


def test_normalisation_drops_case_punctuation_and_articles() -> None:
    assert normalise_answer("The  Capital, of Tortornor is Corith!") == ["capital", "of", "tortornor", "is", "corith"]
    assert normalise_answer("An apple a day") == ["apple", "day"]
    assert normalise_answer("“Quoted” — text’s") == ["quoted", "—", "text", "s"]


@pytest.mark.parametrize(
    ("pred", "truth", "f1", "em"),
    [
        ("The capital of Tortornor is Corith.", "the capital of tortornor is corith", 1.0, True),
        ("Corith.", "The capital of Tortornor is Corith.", 2 * (1.0 * 0.2) / 1.2, False),
        ("Nothing shared here", "Corith", 0.0, False),
        ("", "", 1.0, True),
        ("", "Corith", 0.0, False),
        ("corith corith", "corith", 2 * (0.5 * 1.0) / 1.5, False),  # repeated tokens count once each
    ],
)
def test_token_f1_and_exact_match(pred: str, truth: str, f1: float, em: bool) -> None:
    assert token_f1(pred, truth) == pytest.approx(f1)
    assert exact_match(pred, truth) is em


def _qa(i: int) -> Example:
    return Example(f"id{i}", "instruction", "doc.dlm", 10 + i, prompt=f"q{i}", completion=f"a{i}")


def test_the_sample_is_seeded_bounded_in_document_order_and_skips_prose() -> None:
    exs = [_qa(i) for i in range(50)] + [Example("p", "prose", "doc.dlm", 1, text="prose")]
    a, b = sample_questions(exs, 32, 42), sample_questions(exs, 32, 42)
    assert a == b and len(a) == 32 and all(e.kind == "instruction" for e in a)
    assert [e.line for e in a] == sorted(e.line for e in a)
    assert sample_questions(exs, 32, 7) != a
    assert len(sample_questions(exs, 100, 42)) == 50


def _answer(f1: float, base_f1: float, exact: bool = False) -> Answer:
    return Answer("i", "doc.dlm:3", "q", "a", "x", "y", f1, base_f1, exact, False)


def test_parts_count_learned_answers_at_the_threshold() -> None:
    part = score_part([_answer(1.0, 0.0, True), _answer(LEARNED_F1, 0.1), _answer(LEARNED_F1 - 0.01, 0.9)])
    assert (part.n, part.learned, part.exact, part.base_learned) == (3, 2, 1, 1)
    assert part.f1 == pytest.approx((1.0 + LEARNED_F1 + LEARNED_F1 - 0.01) / 3)
    empty = score_part([])
    assert empty.n == 0 and empty.f1 is None


def test_the_summary_line_reads_like_the_issue() -> None:
    train = score_part([_answer(1.0, 0.1)] * 19 + [_answer(0.3, 0.2)])
    held = score_part([_answer(0.41, 0.18)])
    r = LearningReport(train, held, 1.2, 2.5, 20)
    assert summary_line(r) == (
        "learned: 19/20 training answers (F1 0.97, base 0.11); held-out F1 0.41 (base 0.18); "
        "held-out loss 1.200 (base 2.500), perplexity 3.3 (base 12.2)"
    )
    assert r.to_json()["line"] == summary_line(r)
    assert perplexity(None) is None and perplexity(float("nan")) is None
    none = LearningReport(score_part([]), score_part([]), None, None, 0)
    assert summary_line(none) == "learned: no training Q/A to ask"


# --- the report after a real run (tiny model, real tokenizer, real TRL) ---------------------------


@pytest.mark.integration
def test_every_run_stores_and_shows_its_learning_report(workdir, tmp_path) -> None:
    """`dlm train` answers the sampled training questions and every held-out one with the adapter and
    the base, stores the report as the version's metrics.json, prints its line; `dlm show` (and
    `--json`) show it; `training.report: 0` turns it off."""
    import json
    from pathlib import Path

    from tests.test_commands import dlm, write_doc

    home = tmp_path / "home"
    doc = write_doc(workdir, "report.dlm", extra="  report: 5\n")
    proc = dlm("train", doc.name, home=home, cwd=workdir)
    assert "learned: " in proc.stdout and "training answers" in proc.stdout
    info = json.loads(dlm("show", doc.name, "--json", home=home, cwd=workdir).stdout)
    (version,) = info["versions"]
    learning = version["learning"]
    assert learning["train"]["n"] == 5 and learning["sampled_from"] >= 9  # 12 Q/A, 20% held out
    assert learning["heldout"]["n"] >= 1 and learning["line"].startswith("learned: ")
    metrics = json.loads((Path(version["path"]) / "metrics.json").read_text())
    assert metrics["learning"] == learning and metrics["dlm_metrics"] == 1
    questions = {a["question"] for a in learning["answers"]}
    assert len(learning["answers"]) == 5 + learning["heldout"]["n"] and len(questions) == len(learning["answers"])
    for a in learning["answers"]:
        assert a["expected"].startswith("Item ") and a["source"].startswith("report.dlm:")
        assert 0.0 <= a["f1"] <= 1.0 and 0.0 <= a["base_f1"] <= 1.0
    run = info["runs"][-1]["metrics"]
    assert run["answers_asked"] == 5 and run["learning_line"] == learning["line"]
    assert "learned: " in dlm("show", doc.name, home=home, cwd=workdir).stdout

    off = write_doc(workdir, "noreport.dlm", extra="  report: 0\n")
    proc = dlm("train", off.name, home=home, cwd=workdir)
    assert "learned: " not in proc.stdout
    (version,) = json.loads(dlm("show", off.name, "--json", home=home, cwd=workdir).stdout)["versions"]
    assert version["learning"] is None
