"""Preference training (`training.objective: dpo`, docs/preference.md): the spec's keys and errors, the
plan (reason line, memory, findings with trigger and near miss), the rows and the template check on
the real tokenizer, and DPO-only and SFT-then-DPO runs of TRL's DPOTrainer on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dlm.doc.schema import new_id, parse_spec
from dlm.errors import DlmError, DlmErrors
from dlm.plan import bases
from dlm.plan.corpus import CorpusStats, Example
from dlm.plan.hardware import load_fixture
from dlm.plan.planner import Plan, make_plan
from dlm.plan.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
HW = REPO / "tests" / "fixtures" / "hardware"
ID = "01KAV3J8ZP4N6Q2R7S9T0W1X2Y"

# Made-up house style: every quantity in SI units. Eight to train on, two pinned held out.
UNITS = [
    ("How far is it from the house to the lake?", "It is 2.4 kilometres.", "It is 1.5 miles."),
    ("How heavy is the cat?", "The cat weighs 4.5 kilograms.", "The cat weighs 10 pounds."),
    ("How tall is the door?", "The door is 2.1 metres tall.", "The door is 7 feet tall."),
    ("How warm is the bath?", "The bath is 38 degrees Celsius.", "The bath is 100 degrees Fahrenheit."),
    ("How much milk is in the jug?", "The jug holds 1.9 litres.", "The jug holds half a gallon."),
    ("How long is the garden?", "The garden is 15 metres long.", "The garden is 50 feet long."),
    ("How fast does the train go?", "It goes 120 kilometres per hour.", "It goes 75 miles per hour."),
    ("How deep is the pond?", "The pond is 1.8 metres deep.", "The pond is 6 feet deep."),
    ("How heavy is the suitcase?", "It weighs 20 kilograms.", "It weighs 44 pounds."),
    ("How cold is the freezer?", "It is minus 18 degrees Celsius.", "It is 0 degrees Fahrenheit."),
]


def triples(rows: list[tuple[str, str, str]]) -> str:
    return "\n".join(f"### Prompt\n{p}\n### Chosen\n{c}\n### Rejected\n{r}\n" for p, c, r in rows)


def write(folder: Path, name: str, training: str, body: str, *, base: str = "./tiny") -> Path:
    path = folder / name
    path.write_text(
        f"---\ndlm_id: {new_id()}\nbase_model: {base}\nsystem_prompt: Answer briefly.\ntraining:\n{training}---\n{body}"
    )
    return path


PREF_BODY = f"::preference::\n{triples(UNITS[:8])}\n::preference heldout::\n{triples(UNITS[8:])}"
SFT_BODY = "::instruction::\n### Q\nWhich units does the house use?\n### A\nSI units: metres, kilograms, litres.\n\n"
TINY = "  max_steps: {steps}\n  micro_batch_size: 2\n  grad_accum: 1\n  sequence_len: 64\n  seed: 7\n"


# --- the spec ---------------------------------------------------------------------------------------


def spec(**training: Any):
    return parse_spec({"dlm_id": ID, "training": training})


def test_the_preference_block_parses_with_its_defaults() -> None:
    t = spec(objective="dpo", preference={"loss_type": "ipo", "beta": 0.5}).training
    assert (t.objective, t.preference.loss_type, t.preference.beta) == ("dpo", "ipo", 0.5)
    d = spec().training
    assert d.objective == "sft" and d.preference.reference is None and d.preference.loss_type == "sigmoid"
    for loss in ("sigmoid", "ipo", "sigmoid_norm", "hinge"):  # each one TRL's DPOTrainer takes (checked below)
        assert spec(preference={"loss_type": loss}).training.preference.loss_type == loss


@pytest.mark.parametrize(
    ("preference", "message"),
    [
        ({"betta": 0.1}, "unknown key 'betta'"),
        ({"beta": 0}, "'beta'"),
        ({"beta": 11}, "'beta'"),
        ({"loss_type": "kto"}, "'loss_type'"),
        ({"learning_rate": 0.5}, "'learning_rate'"),
        ({"reference": "policy"}, "'reference'"),
        ({"num_epochs": 0}, "'num_epochs'"),
    ],
)
def test_bad_preference_keys_are_errors_at_their_line(preference: dict, message: str) -> None:
    positions = {("training",): (3, 1), ("training", "preference"): (4, 3)}
    positions.update({("training", "preference", k): (5, 5) for k in preference})
    with pytest.raises(DlmErrors) as caught:
        parse_spec({"dlm_id": ID, "training": {"preference": preference}}, positions, "x.dlm")
    (err,) = caught.value.errors
    assert message in err.message and (err.line, err.col) == (5, 5) and err.hint
    if message.startswith("unknown"):
        assert "beta" in err.hint  # did you mean 'beta'?


def test_dpo_without_triples_is_refused_at_the_objective_line(tmp_path: Path) -> None:
    doc = write(tmp_path, "a.dlm", "  objective: dpo\n", SFT_BODY, base="smollm2-135m")
    with pytest.raises(DlmError) as caught:
        prepare(doc, load_fixture(HW / "cpu.json"))
    assert caught.value.line == 6 and "preference triples" in caught.value.message
    # only held-out triples: still nothing to train on, and the message says so
    held = write(
        tmp_path,
        "b.dlm",
        "  objective: dpo\n",
        SFT_BODY + f"::preference heldout::\n{triples(UNITS[:2])}",
        base="smollm2-135m",
    )
    with pytest.raises(DlmError, match="outside held-out sections"):
        prepare(held, load_fixture(HW / "cpu.json"))


def test_reference_sft_without_an_sft_phase_is_refused_at_its_line(tmp_path: Path) -> None:
    doc = write(
        tmp_path, "a.dlm", "  objective: dpo\n  preference:\n    reference: sft\n", PREF_BODY, base="smollm2-135m"
    )
    with pytest.raises(DlmError) as caught:
        prepare(doc, load_fixture(HW / "cpu.json"))
    assert caught.value.line == 8 and "SFT phase" in caught.value.message
    ok = write(
        tmp_path,
        "b.dlm",
        "  objective: dpo\n  preference:\n    reference: sft\n",
        SFT_BODY + PREF_BODY,
        base="smollm2-135m",
    )
    assert prepare(ok, load_fixture(HW / "cpu.json")).plan.reference == "sft"


def test_a_title_alone_does_not_make_an_sft_phase(tmp_path: Path) -> None:
    """A heading above the triples is prose, but nothing to train a phase on: DPO only, as without it."""
    doc = write(tmp_path, "a.dlm", "  objective: dpo\n", "# Units\n\n" + PREF_BODY, base="smollm2-135m")
    p = prepare(doc, load_fixture(HW / "cpu.json")).plan
    assert p.phases == ("dpo",) and p.reference == "base" and "dpo-without-sft" in {f.code for f in p.findings}
    with_prose = write(
        tmp_path, "b.dlm", "  objective: dpo\n", "# Units\n\nWe use SI.\n\n" + PREF_BODY, base="smollm2-135m"
    )
    assert prepare(with_prose, load_fixture(HW / "cpu.json")).plan.phases == ("sft", "dpo")


def test_the_cli_refuses_an_unknown_preference_key_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    doc = write(tmp_path, "a.dlm", "  objective: dpo\n  preference:\n    bta: 0.2\n", PREF_BODY, base="smollm2-135m")
    proc = subprocess.run(
        [sys.executable, "-m", "dlm", "doctor", str(doc)],
        capture_output=True,
        text=True,
        env={"DLM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"{doc}:8:") and "unknown key 'bta'" in proc.stderr and "hint:" in proc.stderr


# --- the plan ---------------------------------------------------------------------------------------


def stats(n_pref: int = 20, n_other: int = 0, longest: int = 120) -> CorpusStats:
    n = n_pref + n_other
    return CorpusStats(n, 2, n * 60, longest, 0, n, n_preference=n_pref)


def plan(machine: str = "cpu", corpus: CorpusStats | None = None, **training: Any) -> Plan:
    s = parse_spec({"dlm_id": ID, "training": {"objective": "dpo", **training}})
    return make_plan(s, load_fixture(HW / f"{machine}.json"), bases.resolve("smollm2-135m"), corpus or stats())


def test_the_reason_line_names_the_objective_beta_and_reference() -> None:
    assert "objective=dpo(beta=0.1, ref=base)" in plan().reason
    assert "objective=sft+dpo(beta=0.25, ref=sft)" in plan(corpus=stats(20, 10), preference={"beta": 0.25}).reason
    two = plan(corpus=stats(20, 10), preference={"reference": "base"})
    assert two.phases == ("sft", "dpo") and two.reference == "base" and "ref=base" in two.reason
    sft = make_plan(parse_spec({"dlm_id": ID}), load_fixture(HW / "cpu.json"), bases.resolve("smollm2-135m"), stats())
    assert sft.phases == ("sft",) and not sft.dpo_kwargs and "objective" not in sft.reason


def test_dpo_memory_is_two_sequences_a_row_plus_the_reference_forward() -> None:
    fixed = dict(micro_batch_size=4, grad_accum=1, gradient_checkpointing=False)
    dpo = plan(**fixed).estimates.memory_breakdown
    sft = make_plan(
        parse_spec({"dlm_id": ID, "training": fixed}),
        load_fixture(HW / "cpu.json"),
        bases.resolve("smollm2-135m"),
        stats(),
    ).estimates.memory_breakdown
    assert dpo["activations"] == 2 * sft["activations"] and dpo["logits"] == 2 * sft["logits"]
    assert dpo["weights"] == sft["weights"]  # the reference is the same weights, never a second copy
    base = bases.resolve("smollm2-135m")
    tokens = 2 * 4 * 120
    layer = 12 * base.hidden_size + 4 * base.intermediate_size
    assert dpo["reference"] == tokens * (layer * 4 + base.vocab_size * 8)  # fp32 on the CPU fixture
    assert "reference" not in sft


@pytest.mark.integration
def test_dpo_kwargs_carry_the_preference_block_and_bind_to_dpo_config() -> None:
    import inspect

    import trl

    p = plan(preference={"beta": 0.3, "loss_type": "sigmoid_norm", "learning_rate": 2e-5, "num_epochs": 2})
    kw = p.dpo_kwargs
    assert (kw["beta"], kw["loss_type"], kw["learning_rate"], kw["num_train_epochs"]) == (
        0.3,
        ["sigmoid_norm"],
        2e-5,
        2.0,
    )
    assert set(kw) <= set(inspect.signature(trl.DPOConfig).parameters)
    assert p.decision("dpo_steps") == p.estimates.optimizer_steps  # DPO only: the run's steps are DPO's


@pytest.mark.parametrize(
    ("code", "level", "trigger", "near_miss"),
    [
        ("dpo-lr-high", "warn", dict(preference={"learning_rate": 2e-4}), dict(preference={"learning_rate": 1e-4})),
        ("dpo-few-pairs", "warn", dict(corpus=stats(7)), dict(corpus=stats(8))),
        ("dpo-beta-extreme", "warn", dict(preference={"beta": 0.009}), dict(preference={"beta": 0.01})),
        ("dpo-beta-extreme", "warn", dict(preference={"beta": 1.5}), dict(preference={"beta": 1.0})),
        ("dpo-without-sft", "info", dict(corpus=stats(20, 0)), dict(corpus=stats(20, 1))),
    ],
)
def test_dpo_findings_fire_and_near_misses_do_not(code: str, level: str, trigger: dict, near_miss: dict) -> None:
    hit = plan(**trigger)
    found = [f for f in hit.findings if f.code == code]
    assert found and found[0].level == level and found[0].evidence and found[0].hint
    assert (code in hit.reason) == (level == "warn")
    assert code not in {f.code for f in plan(**near_miss).findings}


def test_dpo_findings_stay_quiet_under_objective_sft() -> None:
    s = parse_spec({"dlm_id": ID, "training": {"preference": {"beta": 5, "learning_rate": 1e-3}}})
    p = make_plan(s, load_fixture(HW / "cpu.json"), bases.resolve("smollm2-135m"), stats(3))
    assert not {f.code for f in p.findings} & {"dpo-lr-high", "dpo-few-pairs", "dpo-beta-extreme", "dpo-without-sft"}


# --- rows and the template check, on the real tokenizer ----------------------------------------------


@pytest.mark.integration
def test_rows_render_the_prompt_as_dlm_prompt_does_and_the_template_check(workdir: Path) -> None:
    from transformers import AutoTokenizer

    from dlm.train.preference import pair_rows, template_mismatch
    from dlm.train.rows import question_head

    tok = AutoTokenizer.from_pretrained(str(workdir / "tiny"))
    ex = Example(
        "x", "preference", "t.dlm", 3, prompt="How tall?", completion="2 m.", rejected="7 ft.", system="Be brief."
    )
    (row,) = pair_rows([ex], tok)
    assert row["prompt"] == question_head(tok, ex)  # the very text `dlm prompt` answers after
    assert "Be brief." in row["prompt"] and row["chosen"] == "2 m.<|im_end|>" and row["rejected"] == "7 ft.<|im_end|>"
    assert template_mismatch([row], [ex], tok) is None
    # a prompt whose last characters merge with the answer's first into one token
    bad = {"prompt": "The answer is hel", "chosen": "lo there.", "rejected": " seven feet."}
    found = template_mismatch([bad], [ex], tok)
    assert (
        found
        and found["code"] == "preference-template-mismatch"
        and found["evidence"]["answers"] == ["t.dlm:3 (chosen)"]
    )


# --- training on the tiny model ------------------------------------------------------------------------


def _train(doc: Path, home: Path) -> Any:
    from dlm.train import device, runs

    return runs.train_document(doc, home, device.probe())


@pytest.mark.integration
def test_dpo_only_trains_with_finite_loss_and_a_rising_margin(workdir: Path, tmp_path: Path) -> None:
    training = "  objective: dpo\n" + TINY.format(steps=6) + "  preference:\n    learning_rate: 5.0e-3\n"
    doc = write(workdir, "dpo-only.dlm", training, PREF_BODY)
    out = _train(doc, tmp_path / "home")
    s = out.summary
    assert s.status == "ok" and s.steps == 6 and [p["phase"] for p in s.phases] == ["dpo"]
    log = [
        json.loads(line) for line in (Path(out.store.root) / "runs" / out.run_id / "log.jsonl").read_text().splitlines()
    ]
    losses = [e["loss"] for e in log if "loss" in e]
    margins = [e["rewards/margins"] for e in log if "rewards/margins" in e]
    assert len(losses) == 6 and all(0 < x < 10 for x in losses)
    assert abs(losses[0] - 0.6931) < 1e-3  # log(2): the new adapter starts equal to its reference
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > margins[0]
    train = s.preference["train"]
    assert train["n"] == 8 and train["reward_margin"] > 0 and train["reward_accuracy"] >= 0.75
    assert s.preference["heldout"]["n"] == 2 and s.preference["reference"] == "base"
    metrics = json.loads((out.store.root / "versions" / out.version / "metrics.json").read_text())
    assert metrics["pref_accuracy"] == s.preference["heldout"]["pref_accuracy"]
    assert metrics["train_reward_margin"] == train["reward_margin"] and metrics["phases"][0]["steps"] == 6


@pytest.mark.integration
def test_sft_then_dpo_is_one_version_with_both_phases(workdir: Path, tmp_path: Path) -> None:
    training = "  objective: dpo\n" + TINY.format(steps=2)
    doc = write(workdir, "two-phase.dlm", training, SFT_BODY + PREF_BODY)
    home = tmp_path / "home"
    out = _train(doc, home)
    s = out.summary
    assert s.status == "ok" and s.steps == 4
    assert [(p["phase"], p["steps"]) for p in s.phases] == [("sft", 2), ("dpo", 2)]
    assert s.phases[0]["train_loss"] > 2 and s.phases[1]["train_loss"] < 1  # SFT's token loss, then DPO's ~log 2
    root = out.store.root
    assert [v.name for v in out.store.versions()] == ["v0001"]
    version = root / "versions" / "v0001"
    assert not (version / "ref").exists()  # reference: sft's frozen copy is not saved with the adapter
    metrics = json.loads((version / "metrics.json").read_text())
    assert [p["phase"] for p in metrics["phases"]] == ["sft", "dpo"] and metrics["preference"]["reference"] == "sft"
    assert metrics["pref_n"] == 2 and 0 <= metrics["pref_accuracy"] <= 1 and "reward_margin" in metrics
    assert not list((root / "runs").glob("*/checkpoints*"))
    code = (
        "import sys; from peft import PeftModel; from transformers import AutoModelForCausalLM;"
        "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]);"
        "print(sorted(m.peft_config))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "tiny"), str(version)], capture_output=True, text=True, timeout=120
    )
    assert loaded.stdout.strip() == "['default']", loaded.stderr[-2000:]
    shown = subprocess.run(
        [sys.executable, "-m", "dlm", "show", str(doc), "--json"],
        capture_output=True,
        text=True,
        env={"DLM_HOME": str(home), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    info = json.loads(shown.stdout)
    assert info["versions"][0]["preference"]["heldout"]["n"] == 2


@pytest.mark.integration
def test_a_loss_type_twin_is_judged_on_pref_accuracy_and_reward_margin(workdir: Path, tmp_path: Path) -> None:
    """`dlm twin --set training.preference.loss_type=ipo`, both trained, `compare --metric pref_accuracy`:
    each side's figure is its version's metrics.json, the base's its own accuracy and a margin of 0."""
    from dlm.doc.authoring import make_twin
    from dlm.use import compare as cmp

    home = tmp_path / "home"
    training = "  objective: dpo\n" + TINY.format(steps=2) + "  preference:\n    beta: 0.1\n"
    a = write(workdir, "twin-a.dlm", training, PREF_BODY)
    b = make_twin(a, ["training.preference.loss_type=ipo"], workdir / "twin-b.dlm")
    assert "loss_type: ipo" in b.read_text()
    ma, mb = (_train(doc, home).summary.preference["heldout"] for doc in (a, b))
    c = cmp.compare(a, b, home, metric="pref_accuracy", min_gain=0.0)
    assert (c.a.pref_accuracy, c.b.pref_accuracy) == (ma["pref_accuracy"], mb["pref_accuracy"])
    assert c.base.pref_accuracy == ma["base_pref_accuracy"] and c.base.reward_margin == 0.0
    assert c.verdict.metric == "pref_accuracy" and c.verdict.better == "higher" and c.verdict.keep in ("A", "B")
    margin = cmp.compare(a, b, home, metric="reward_margin", min_gain=0.0)
    assert margin.verdict.a_value == ma["reward_margin"] and margin.verdict.b_value == mb["reward_margin"]
    assert margin.to_json()["sides"]["B"]["reward_margin"] == mb["reward_margin"]


@pytest.mark.integration
def test_dpo_only_sigint_then_resume_equals_uninterrupted(workdir: Path, tmp_path: Path) -> None:
    """The DPO phase checkpoints and resumes as SFT runs do: a Ctrl-C at step 3 saves a checkpoint;
    resuming from it ends with the very adapter tensors of an uninterrupted run."""
    import os
    import signal

    from safetensors.torch import load_file

    from dlm.train import device
    from dlm.train import run as train

    training = (
        "  objective: dpo\n" + TINY.format(steps=5) + "  save_steps: 2\n  preference:\n    learning_rate: 5.0e-3\n"
    )
    p = prepare(write(workdir, "resume.dlm", training, PREF_BODY), device.probe())
    base = workdir / "tiny"
    full = train.run(p.plan, p.train, p.heldout, base, tmp_path / "full", eval_base=False)

    def interrupt(step, *_):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cut = train.run(p.plan, p.train, p.heldout, base, tmp_path / "cut", on_step=interrupt)
    assert cut.status == "interrupted" and cut.adapter_dir is None and cut.preference is None
    assert cut.checkpoint and Path(cut.checkpoint).name == f"checkpoint-{cut.steps}"
    resumed = train.run(p.plan, p.train, p.heldout, base, tmp_path / "cut", resume_from=True, eval_base=False)
    assert resumed.status == "ok" and resumed.steps == full.steps == 5
    a = load_file(str(Path(full.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert full.train_loss == resumed.train_loss and full.preference == resumed.preference


@pytest.mark.integration
def test_the_shipped_preference_config_plans_both_phases_and_builds_its_dpo_config(tmp_path: Path) -> None:
    from dlm.train.preference import dpo_config

    p = prepare(REPO / "configs" / "preference.dlm", load_fixture(HW / "cpu.json"))
    assert p.plan.phases == ("sft", "dpo") and "objective=sft+dpo(beta=0.1, ref=base)" in p.plan.reason
    assert p.corpus.n_preference == 24 and p.corpus.n_preference_heldout == 6
    # grad_accum 1: SFT on the 4 pairs + the prose, 2 steps an epoch x 3; DPO 24 triples / 4 x 5 epochs
    assert p.plan.decision("steps") == 6 and p.plan.decision("dpo_steps") == 30
    assert "reference" in p.plan.estimates.memory_breakdown
    cfg = dpo_config(p.plan, tmp_path)
    assert (cfg.beta, cfg.loss_type, cfg.learning_rate, cfg.save_steps) == (0.1, ["sigmoid"], 1e-4, 8)  # ceil(30 / 4)


def test_the_preference_line_shows_adapter_and_base_for_each_part() -> None:
    from dlm.cli.render import preference_line

    m = {"n": 6, "pref_accuracy": 0.833, "base_pref_accuracy": 0.5, "reward_margin": 0.4123}
    line = preference_line({"beta": 0.1, "reference": "base", "heldout": m, "train": {"n": 0}})
    assert (
        line == "preference: held-out 6 triples: accuracy 0.83 (base 0.50), reward margin +0.412 (beta 0.1, ref base)"
    )
