"""`dlm compare --metric pref_accuracy / reward_margin` with an interval: each version keeps its
held-out triples' log-prob margins (metrics.json `pref_per_example`), and compare's paired bootstrap
resamples them, paired by triple id. Twins trained by real DPO runs on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlm.use import compare as cmp
from tests.test_preference import TINY, UNITS, triples, write

# The held-out triples ask the training ones again without the question mark, with the same two
# answers: an adapter that learned to prefer the SI answers prefers them here too, one that barely
# moved does not.
REWORDED = [(p.rstrip("?"), c, r) for p, c, r in UNITS[:8]]
BODY = f"::preference::\n{triples(UNITS[:8])}\n::preference heldout::\n{triples(REWORDED)}"


def pref_doc(folder: Path, name: str, learning_rate: str, steps: int = 8) -> Path:
    training = (
        "  objective: dpo\n"
        + TINY.format(steps=steps)
        + "  report: 0\n"
        + f"  preference:\n    learning_rate: {learning_rate}\n"
    )
    return write(folder, name, training, BODY)


@pytest.fixture(scope="module")
def pref_twins(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A: 2 DPO steps at a learning rate too low to move (1e-7); B: the twin, 8 steps at 1e-2, which learns."""
    from dlm.train import device, runs

    home = tmp_path_factory.mktemp("pref-home")
    a, b = pref_doc(workdir, "pref-a.dlm", "1.0e-7", steps=2), pref_doc(workdir, "pref-b.dlm", "1.0e-2")
    for doc in (a, b):
        assert runs.train_document(doc, home, device.probe()).summary.status == "ok"
    return home, a, b


def version(home: Path, doc: Path) -> Path:
    dlm_id = doc.read_text().split("dlm_id: ", 1)[1].split("\n", 1)[0]
    return home / "store" / dlm_id / "versions" / "v0001"


@pytest.mark.integration
def test_each_version_keeps_its_heldout_triples_margins(pref_twins) -> None:
    home, a, _ = pref_twins
    folder = version(home, a)
    metrics = json.loads((folder / "metrics.json").read_text())
    rec = metrics["pref_per_example"]
    assert len(rec["ids"]) == len(rec["logp_margin"]) == len(rec["base_logp_margin"]) == metrics["pref_n"] == 8
    assert metrics["pref_accuracy"] == pytest.approx(sum(m > 0 for m in rec["logp_margin"]) / 8)
    beta = metrics["preference"]["beta"]
    margins = [beta * (m - b) for m, b in zip(rec["logp_margin"], rec["base_logp_margin"])]
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / 8, rel=1e-9, abs=1e-12)
    # the lists live in one place: not in the flat figures, the preference block or the summary
    assert "per_example" not in metrics["preference"]["heldout"] and "train_per_example" not in metrics
    summary = json.loads((folder / "summary.json").read_text())
    assert "per_example" not in summary["preference"]["heldout"]
    manifest = json.loads((folder.parent.parent / "manifest.json").read_text())
    assert all("per_example" not in k for run in manifest["runs"] for k in run["metrics"])


@pytest.mark.integration
def test_pref_accuracy_and_reward_margin_get_an_interval_and_a_verdict(pref_twins) -> None:
    """B's implicit reward margin is positive on every held-out triple, A's (which barely moved) about 0:
    the interval clears the min gain one way round (`B pays`) and falls short the other (`keep A`)."""
    home, a, b = pref_twins
    pays = cmp.compare(a, b, home, metric="reward_margin", min_gain=0.05)
    v = pays.verdict
    assert v.b_value > v.a_value and v.gain_low is not None and v.examples == 8
    assert v.outcome == "B pays" and v.gain_low >= 0.05, v.reason
    assert not any("no per-example" in n for n in pays.notes)
    back = cmp.compare(b, a, home, metric="reward_margin", min_gain=0.05).verdict  # the learner as the baseline
    assert back.outcome == "keep A" and back.gain_high < 0.05, back.reason
    acc = cmp.compare(a, b, home, metric="pref_accuracy", min_gain=0.05)
    assert acc.verdict.gain_low is not None and acc.verdict.gain_low <= acc.verdict.gain <= acc.verdict.gain_high
    assert acc.verdict.examples == 8 and not any("no per-example" in n for n in acc.notes)
    # the base row as before: the base's own accuracy and a margin of 0
    assert acc.base.pref_accuracy == json.loads((version(home, a) / "metrics.json").read_text())["base_pref_accuracy"]
    assert acc.base.reward_margin == 0.0


def write_pref_version(folder: Path, ids: list[str], margins: list[float], base: list[float], beta: float) -> Path:
    folder.mkdir(parents=True)
    record = {"ids": ids, "logp_margin": margins, "base_logp_margin": base}
    (folder / "metrics.json").write_text(
        json.dumps({"pref_n": len(ids), "preference": {"beta": beta}, "pref_per_example": record})
    )
    return folder


def test_run_figures_align_triples_by_id_and_refuse_other_heldout_sets(tmp_path: Path) -> None:
    fa = write_pref_version(tmp_path / "a", ["t1", "t2", "t3"], [0.5, -0.2, 1.0], [0.1, 0.1, 0.1], 0.1)
    # B lists the same triples in another order: figures follow A's order
    fb = write_pref_version(tmp_path / "b", ["t3", "t1", "t2"], [2.0, -1.0, 0.3], [0.1, 0.1, 0.1], 0.5)
    (acc_a,), (acc_b,) = cmp.run_figures("pref_accuracy", {}, [("A", fa)], [("B", fb)])
    assert acc_a == [1.0, 0.0, 1.0] and acc_b == [0.0, 1.0, 1.0]
    (rm_a,), (rm_b,) = cmp.run_figures("reward_margin", {}, [("A", fa)], [("B", fb)])
    assert rm_a == pytest.approx([0.1 * 0.4, 0.1 * -0.3, 0.1 * 0.9])
    assert rm_b == pytest.approx([0.5 * -1.1, 0.5 * 0.2, 0.5 * 1.9])  # B's own beta
    other = write_pref_version(tmp_path / "c", ["t1", "t2", "t9"], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], 0.1)
    assert cmp.run_figures("pref_accuracy", {}, [("A", fa)], [("B", other)]) is None
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"pref_n": 3, "pref_accuracy": 0.5, "reward_margin": 0.1}))
    assert cmp.run_figures("reward_margin", {}, [("A", fa)], [("B", old)]) is None
    assert cmp.run_figures("pref_accuracy", {}, [("A", old)], [("B", fa)]) is None
