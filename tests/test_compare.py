"""dlm compare: the verdict rule, the config diff, the JSON shape, the refusals, and (integration)
twins trained on the tiny model and judged through the real CLI.

The unit tests never import torch: version folders are written by the tests themselves (the layout
runs.train_document writes) and `infer.score_adapters` is replaced where a whole compare() runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from dlm.errors import DlmError
from dlm.use import compare as cmp
from dlm.use.verdict import Comparison, Side, check_options, config_diff, decide, perplexity, relative_gain

REPO = Path(__file__).resolve().parent.parent
ID_A, ID_B, ID_C = "01KAV3J8ZP4N6Q2R7S9T0W1X2A", "01KAV3J8ZP4N6Q2R7S9T0W1X2B", "01KAV3J8ZP4N6Q2R7S9T0W1X2C"


def side(
    role: str,
    loss: float | None = 2.0,
    kl: float | None = 0.1,
    *,
    step: float | None = 1.0,
    mem: int | None = 1000,
    seconds: float | None = 10.0,
    params: int | None = 100,
    size: int | None = 400,
) -> Side:
    return Side(
        role, f"{role}.dlm", None, "v0001", "lora", loss, perplexity(loss), kl, step, seconds, 5, mem, params, size
    )


# ---------------------------------------------------------------- the verdict rule


def test_eval_loss_gain_below_min_keeps_a() -> None:
    v = decide("eval_loss", 0.05, side("A", 2.0), side("B", 1.95))
    assert v.gain == pytest.approx(0.025) and not v.b_pays and v.keep == "A" and v.better == "lower"
    assert v.reason.startswith("keep A:") and "below the 5.0% min gain" in v.reason


def test_eval_loss_gain_at_or_above_min_keeps_b() -> None:
    v = decide("eval_loss", 0.05, side("A", 2.0), side("B", 1.8))
    assert v.gain == pytest.approx(0.1) and v.b_pays and v.keep == "B" and v.reason.startswith("keep B:")
    # exactly 5%: (2.0 - 1.9) / 2.0 is 0.04999999999999993 in floats; "at least" must still hold
    assert decide("eval_loss", 0.05, side("A", 2.0), side("B", 1.9)).b_pays


def test_b_worse_never_pays_at_a_positive_min_gain() -> None:
    v = decide("eval_loss", 0.05, side("A", 2.0), side("B", 2.4))
    assert v.gain == pytest.approx(-0.2) and not v.b_pays


def test_zero_min_gain_counts_a_tie_as_paying() -> None:
    assert decide("eval_loss", 0.0, side("A", 2.0), side("B", 2.0)).b_pays
    assert not decide("eval_loss", 0.0, side("A", 2.0), side("B", 2.0000001)).b_pays


@pytest.mark.parametrize(
    ("b_loss", "min_gain", "pays"),
    [
        (2.1, -0.1, True),  # 5% worse, 10% tolerated
        (2.1, -0.01, False),  # 5% worse, 1% tolerated
        (4.0, -1.0, True),  # -1 tolerates up to twice A's loss
        (4.1, -1.0, False),
    ],
)
def test_negative_min_gain_is_a_tolerance(b_loss: float, min_gain: float, pays: bool) -> None:
    assert decide("eval_loss", min_gain, side("A", 2.0), side("B", b_loss)).b_pays is pays


def test_delta_kl_higher_is_better() -> None:
    v = decide("delta_kl", 0.05, side("A", kl=0.10), side("B", kl=0.12))
    assert v.better == "higher" and v.gain == pytest.approx(0.2) and v.b_pays
    v = decide("delta_kl", 0.05, side("A", kl=0.10), side("B", kl=0.09))
    assert v.gain == pytest.approx(-0.1) and not v.b_pays
    # the metric is the one judged: B's better loss does not matter under delta_kl
    assert not decide("delta_kl", 0.05, side("A", 3.0, 0.1), side("B", 1.0, 0.1)).b_pays


def test_delta_kl_of_zero_at_a() -> None:
    v = decide("delta_kl", 1.0, side("A", kl=0.0), side("B", kl=0.01))
    assert v.gain == math.inf and v.b_pays and v.to_json()["gain"] is None and v.to_json()["b_pays"] is True
    assert relative_gain("delta_kl", 0.0, 0.0) == 0.0
    assert decide("delta_kl", 0.0, side("A", kl=0.0), side("B", kl=0.0)).b_pays
    assert not decide("delta_kl", 0.05, side("A", kl=0.0), side("B", kl=0.0)).b_pays


def test_missing_or_non_finite_metric_keeps_a() -> None:
    for a, b in ((None, 1.0), (1.0, None), (math.nan, 1.0), (1.0, math.inf)):
        v = decide("eval_loss", -1.0, side("A", a), side("B", b))
        assert v.gain is None and not v.b_pays and v.keep == "A" and "missing" in v.reason


def test_cost_ratios_are_b_over_a_and_named_in_the_reason() -> None:
    v = decide(
        "eval_loss",
        0.05,
        side("A", step=2.0, mem=1000, seconds=20.0, params=100, size=400),
        side("B", step=2.76, mem=1100, seconds=30.0, params=110, size=440),
    )
    assert v.step_time_ratio == pytest.approx(1.38) and v.memory_ratio == pytest.approx(1.1)
    assert v.train_time_ratio == pytest.approx(1.5) and v.params_ratio == pytest.approx(1.1)
    assert v.adapter_bytes_ratio == pytest.approx(1.1)
    assert "x1.38 step time" in v.reason and "x1.10 peak memory" in v.reason
    unknown = decide("eval_loss", 0.05, side("A", step=None, mem=0), side("B"))
    assert unknown.step_time_ratio is None and unknown.memory_ratio is None and "unknown" in unknown.reason


@pytest.mark.parametrize(
    ("metric", "min_gain"),
    [
        ("loss", 0.05),
        ("eval-loss", 0.05),
        ("eval_loss", 1.5),
        ("eval_loss", -1.01),
        ("delta_kl", math.nan),
        ("delta_kl", math.inf),
        ("eval_loss", 5),
    ],
)
def test_bad_options_are_exit_2_with_a_hint(metric: str, min_gain: float) -> None:
    with pytest.raises(DlmError) as info:
        check_options(metric, min_gain)
    assert info.value.exit_code == 2 and info.value.hint


@pytest.mark.parametrize("min_gain", [-1, -0.5, 0, 0.05, 1])
def test_good_options_pass(min_gain: float) -> None:
    check_options("eval_loss", min_gain)
    check_options("delta_kl", min_gain)


# ---------------------------------------------------------------- the config diff


def spec(dlm_id: str = ID_A, **training) -> dict:
    base = {"adapter": "lora", "lora_r": 8, "lora_dropout": 0.0, "target_modules": "auto", "seed": 42}
    return {
        "dlm_id": dlm_id,
        "dlm_version": 1,
        "base_model": "smollm2-135m",
        "system_prompt": None,
        "training": {**base, **training},
        "data": [],
    }


def test_config_diff_lists_every_nested_key_and_leaves_dlm_id_out() -> None:
    diff = config_diff(spec(ID_A), spec(ID_B, adapter="dora", lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    assert [(d.key, d.a, d.b, d.source) for d in diff] == [
        ("training.adapter", "lora", "dora", "spec"),
        ("training.lora_dropout", 0.0, 0.05, "spec"),
        ("training.target_modules", "auto", ["q_proj", "v_proj"], "spec"),
    ]
    assert config_diff(spec(ID_A), spec(ID_B)) == ()  # twins that differ only in id: nothing to report


def test_config_diff_on_deeper_nesting_and_absent_keys() -> None:
    a = {"training": {"opt": {"galore": {"rank": 128, "gap": 200}}}, "only_a": 1}
    b = {"training": {"opt": {"galore": {"rank": 64, "gap": 200}}, "extra": True}}
    keys = {d.key: (d.a, d.b) for d in config_diff(a, b)}
    assert keys == {"training.opt.galore.rank": (128, 64), "only_a": (1, None), "training.extra": (None, True)}


def test_config_diff_includes_plan_decisions_and_hardware() -> None:
    plan_a = {
        "decisions": [
            {"key": "micro_batch_size", "value": 4, "reason": "fits"},
            {"key": "precision", "value": "fp32", "reason": "cpu"},
        ]
    }
    plan_b = {
        "decisions": [
            {"key": "micro_batch_size", "value": 2, "reason": "dora needs more"},
            {"key": "precision", "value": "fp32", "reason": "cpu"},
        ]
    }
    hw_a = {"device": "cpu", "name": "EPYC", "cores": 2, "cpu_flags": ["avx2"]}
    hw_b = {"device": "cpu", "name": "Xeon", "cores": 2, "cpu_flags": []}
    plan_b["decisions"].append({"key": "adapter", "value": "dora", "reason": "echo"})
    plan_a["decisions"].append({"key": "adapter", "value": "lora", "reason": "echo"})
    diff = config_diff(spec(ID_A), spec(ID_B, adapter="dora"), plan_a, plan_b, hw_a, hw_b)
    assert [(d.key, d.source) for d in diff] == [
        ("training.adapter", "spec"),
        ("plan.micro_batch_size", "plan"),
        ("hardware.name", "hardware"),
    ]


# ---------------------------------------------------------------- version folders, JSON shape, rendering

SIDE_KEYS = {
    "role": str,
    "path": (str, type(None)),
    "dlm_id": (str, type(None)),
    "version": (str, type(None)),
    "adapter": (str, type(None)),
    "eval_loss": float,
    "perplexity": float,
    "delta_kl": float,
    "steady_step_seconds": (float, type(None)),
    "train_seconds": (float, type(None)),
    "steps": (int, type(None)),
    "peak_memory_bytes": (int, type(None)),
    "trainable_params": (int, type(None)),
    "adapter_bytes": (int, type(None)),
    "stale": bool,
    "answer_f1": (float, type(None)),
    "pref_accuracy": (float, type(None)),
    "reward_margin": (float, type(None)),
}
VERDICT_KEYS = {
    "metric": str,
    "better": str,
    "min_gain": float,
    "a_value": float,
    "b_value": float,
    "gain": (float, type(None)),
    "b_pays": bool,
    "keep": str,
    "step_time_ratio": (float, type(None)),
    "memory_ratio": (float, type(None)),
    "train_time_ratio": (float, type(None)),
    "params_ratio": (float, type(None)),
    "adapter_bytes_ratio": (float, type(None)),
    "reason": str,
}


def check_shape(data: dict) -> None:
    """The documented `dlm compare --json` shape (docs/compare.md, "JSON"), key for key."""
    assert set(data) == {
        "dlm_compare",
        "metric",
        "min_gain",
        "heldout",
        "data",
        "sides",
        "config_diff",
        "verdict",
        "notes",
    }
    assert data["dlm_compare"] == 1 and data["metric"] in ("eval_loss", "delta_kl", "answer_f1")
    assert isinstance(data["min_gain"], float)
    assert set(data["heldout"]) == {"examples", "tokens", "from"} and data["heldout"]["from"] == "A"
    assert data["heldout"]["examples"] > 0 and data["heldout"]["tokens"] > 0
    assert set(data["data"]) == {"same", "corpus_sha256"} and set(data["data"]["corpus_sha256"]) == {"A", "B"}
    assert set(data["sides"]) == {"base", "A", "B"}
    for role, s in data["sides"].items():
        assert set(s) == set(SIDE_KEYS) and s["role"] == role
        for key, kind in SIDE_KEYS.items():
            assert isinstance(s[key], kind), (role, key, s[key])
    for d in data["config_diff"]:
        assert set(d) == {"key", "a", "b", "source"} and d["source"] in ("spec", "plan", "hardware")
    assert set(data["verdict"]) == set(VERDICT_KEYS)
    for key, kind in VERDICT_KEYS.items():
        assert isinstance(data["verdict"][key], kind), (key, data["verdict"][key])
    assert data["verdict"]["keep"] in ("A", "B") and all(isinstance(n, str) for n in data["notes"])
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere


def write_version(folder: Path, spec_json: dict, *, step: float, mem: int, corpus: str = "c" * 64) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1234)
    docs = {
        "spec": spec_json,
        "plan": {"decisions": [{"key": "micro_batch_size", "value": 4, "reason": "r"}]},
        "hardware": {"device": "cpu", "name": "test cpu", "cores": 2},
        "summary": {
            "status": "ok",
            "steps": 4,
            "seconds": 12.5,
            "steady_step_seconds": step,
            "peak_memory_bytes": mem,
            "trainable_params": 1000,
            "adapter_bytes": 1234,
            "run": "r0001",
            "version": folder.name,
            "corpus_sha256": corpus,
            "doc_sha256": "d" * 64,
        },
    }
    for name, body in docs.items():
        (folder / f"{name}.json").write_text(json.dumps(body))
    (folder / "log.jsonl").write_text(
        "".join(json.dumps({"step": i, "seconds": i * 0.5, "loss": 3.0 - i * 0.2}) + "\n" for i in range(1, 5))
        + json.dumps({"step": 4, "eval_loss": 2.5})
        + "\n"
    )
    return folder


SCORES = {"examples": 3, "tokens": 57, "loss": {"base": 3.2, "A": 2.4, "B": 2.2}, "delta_kl": {"A": 0.31, "B": 0.36}}


@pytest.fixture
def comparison(tmp_path: Path) -> Comparison:
    fa = write_version(tmp_path / "a" / "v0001", spec(ID_A), step=1.0, mem=2_000_000)
    fb = write_version(tmp_path / "b" / "v0002", spec(ID_B, adapter="dora"), step=1.3, mem=2_100_000)
    return cmp.assemble(fa, fb, "a.dlm", "b.dlm", SCORES, base_name="smollm2-135m", metric="eval_loss", min_gain=0.05)


def test_assembled_comparison_has_every_metric_and_the_documented_json(comparison: Comparison) -> None:
    c = comparison
    assert (c.base.eval_loss, c.a.eval_loss, c.b.eval_loss) == (3.2, 2.4, 2.2)
    assert c.a.perplexity == pytest.approx(math.exp(2.4)) and c.base.delta_kl == 0.0 and c.b.delta_kl == 0.36
    assert c.a.version == "v0001" and c.b.adapter == "dora" and c.a.dlm_id == ID_A and c.b.adapter_bytes == 1234
    assert c.same_data and [d.key for d in c.differences] == ["training.adapter"]
    assert c.verdict.gain == pytest.approx(0.2 / 2.4) and c.verdict.keep == "B"
    assert c.verdict.step_time_ratio == pytest.approx(1.3) and c.verdict.memory_ratio == pytest.approx(1.05)
    assert len(c.a.log) == 5 and "log" not in c.a.to_json()
    data = json.loads(json.dumps(c.to_json()))
    check_shape(data)
    assert data["sides"]["base"]["adapter"] is None and data["sides"]["base"]["steady_step_seconds"] is None


def test_render_shows_rows_metrics_diff_and_verdict(comparison: Comparison) -> None:
    from dlm.cli import render

    console = Console(record=True, width=80)  # a CI log: every column must still be whole
    render.comparison(console, comparison)
    text = console.export_text()
    for needle in (
        "A = a.dlm (v0001, lora)",
        "B = b.dlm (v0002, dora)",
        " base ",
        " A ",
        " B * ",
        "3.2000",
        "2.4000",
        "2.2000",
        "0.36",
        "1.300",
        "12.5 s",
        "GiB",
        "1,000",
        "1.2 KiB",
        "training.adapter",
        '"lora"',
        '"dora"',
        "step time x1.30",
        "peak memory x1.05",
        "verdict: keep B",
    ):
        assert needle in text, needle
    assert "…" not in text  # nothing truncated


def test_plot_writes_a_png(comparison: Comparison, tmp_path: Path) -> None:
    from dlm.cli.plot import comparison_png

    out = comparison_png(comparison, tmp_path / "sub" / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ---------------------------------------------------------------- compare(): refusals and the flow, no torch

BODY = """::instruction::
### Q
What is a decorator?
### A
A function that wraps another function.

### Q
What does yield do?
### A
It makes the function a generator.

::instruction heldout::
### Q
What is a module?
### A
A file of Python code.
"""


def write_doc(path: Path, dlm_id: str, *, adapter: str = "lora", body: str = BODY, extra: str = "") -> Path:
    path.write_text(
        f"---\ndlm_id: {dlm_id}\nbase_model: smollm2-135m\ntraining:\n  adapter: {adapter}\n"
        f"  max_steps: 3\n{extra}---\n{body}"
    )
    return path


def fake_train(path: Path, home: Path, heldout_f1: tuple[float, float] | None = None) -> str:
    """What runs.train_document leaves behind, without training: a committed version with its documents."""
    from dlm.plan import hardware
    from dlm.plan.prepare import prepare
    from dlm.store import current
    from dlm.store.opening import open_store

    prepared = prepare(path, hardware.probe_light())
    store = open_store(home, prepared.spec.dlm_id, Path(prepared.doc.path), prepared.spec.base_model)
    staged = path.parent / f"staged-{prepared.spec.dlm_id}-{len(store.versions())}"
    staged.mkdir()
    # a valid, finite safetensors file: an 8-byte header length, the JSON header, 8 bytes of data
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (staged / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    summary = {
        "status": "ok",
        "steps": 3,
        "seconds": 5.0,
        "steady_step_seconds": 0.5,
        "peak_memory_bytes": 10**9,
        "trainable_params": 1000,
        "adapter_bytes": 32,
        "doc_sha256": current.doc_sha256(prepared),
        "corpus_sha256": current.corpus_sha256(prepared),
    }
    with store.lock():
        run = store.begin_run(summary["doc_sha256"], 42, {})
        version = store.commit_version(
            run,
            staged,
            {},
            {
                "spec": prepared.spec.model_dump(mode="json"),
                "plan": prepared.plan.to_json(),
                "summary": summary,
                **(
                    {"metrics": {"learning": {"heldout": {"n": 2, "f1": heldout_f1[0], "base_f1": heldout_f1[1]}}}}
                    if heldout_f1
                    else {}
                ),
            },
        )
        store.end_run(run, "ok", {})
    return version


@pytest.fixture
def no_torch_scoring(monkeypatch: pytest.MonkeyPatch) -> list:
    """compare() without weights: the base folder and the scores are stand-ins; calls are recorded."""
    from dlm.train import basefolder
    from dlm.use import infer

    calls: list = []

    def score(base_folder, adapters, examples, **kw):
        calls.append((base_folder, dict(adapters), list(examples), kw))
        return {**SCORES, "examples": len(list(examples))}

    monkeypatch.setattr(basefolder, "materialize", lambda facts, home: Path("/nonexistent/base"))
    monkeypatch.setattr(infer, "score_adapters", score)
    return calls


def test_compare_refuses_one_document_twice(home: Path, tmp_path: Path) -> None:
    a = write_doc(tmp_path / "a.dlm", ID_A)
    with pytest.raises(DlmError, match="one store, not twins") as info:
        cmp.compare(a, a, home)
    assert info.value.exit_code == 2 and "dlm twin" in info.value.hint


def test_compare_refuses_different_corpora_unless_allowed(home: Path, tmp_path: Path) -> None:
    a = write_doc(tmp_path / "a.dlm", ID_A)
    b = write_doc(tmp_path / "b.dlm", ID_B, adapter="dora", body=BODY.replace("wraps", "decorates"))
    with pytest.raises(DlmError, match="other examples") as info:
        cmp.compare(a, b, home)
    assert info.value.exit_code == 2 and "--allow-different-data" in info.value.hint
    with pytest.raises(DlmError, match="no trained adapter"):  # allowed: it gets as far as the stores
        cmp.compare(a, b, home, allow_different_data=True)


def test_compare_without_adapters_says_how_to_train(home: Path, tmp_path: Path) -> None:
    a, b = write_doc(tmp_path / "a.dlm", ID_A), write_doc(tmp_path / "b.dlm", ID_B, adapter="dora")
    with pytest.raises(DlmError) as info:
        cmp.compare(a, b, home)
    assert info.value.exit_code == 2 and info.value.message == "A has no trained adapter yet"
    assert "--train" in info.value.hint and f"dlm train {a}" in info.value.hint
    assert not (home / "store").exists() or not any((home / "store").rglob("manifest.json"))  # nothing written


def test_compare_without_heldout_examples_refuses(home: Path, tmp_path: Path) -> None:
    body = BODY.replace("::instruction heldout::", "::instruction::")
    a = write_doc(tmp_path / "a.dlm", ID_A, body=body, extra="  eval_fraction: 0\n")
    b = write_doc(tmp_path / "b.dlm", ID_B, adapter="dora", body=body, extra="  eval_fraction: 0\n")
    with pytest.raises(DlmError, match="no held-out examples") as info:
        cmp.compare(a, b, home)
    assert "eval_fraction" in info.value.hint


def test_compare_flow_scores_a_heldout_with_both_adapters(home: Path, tmp_path: Path, no_torch_scoring) -> None:
    a, b = write_doc(tmp_path / "a.dlm", ID_A), write_doc(tmp_path / "b.dlm", ID_B, adapter="dora")
    assert fake_train(a, home) == "v0001" and fake_train(b, home) == "v0001"
    c = cmp.compare(a, b, home, metric="delta_kl", min_gain=0.05)
    ((base_folder, adapters, examples, kw),) = no_torch_scoring
    assert set(adapters) == {"A", "B"} and adapters["A"].name == "v0001" and ID_B in str(adapters["B"])
    assert [e.prompt for e in examples] == ["What is a module?"] and kw["max_length"]
    assert c.verdict.metric == "delta_kl" and c.verdict.gain == pytest.approx(0.05 / 0.31) and c.verdict.b_pays
    assert [d.key for d in c.differences] == ["training.adapter"]  # plan.adapter only echoes it
    assert not c.a.stale and not c.b.stale and c.notes == () and c.same_data
    check_shape(c.to_json())


def test_compare_judges_on_the_learning_reports_answer_f1(home: Path, tmp_path: Path, no_torch_scoring) -> None:
    """`--metric answer_f1`: each version's held-out answer F1 from its metrics.json (the base's from A's);
    a version without a learning report leaves the metric missing, never a guess."""
    a, b = write_doc(tmp_path / "a.dlm", ID_A), write_doc(tmp_path / "b.dlm", ID_B, adapter="dora")
    fake_train(a, home, heldout_f1=(0.5, 0.1)), fake_train(b, home, heldout_f1=(0.6, 0.1))
    c = cmp.compare(a, b, home, metric="answer_f1", min_gain=0.05)
    assert (c.base.answer_f1, c.a.answer_f1, c.b.answer_f1) == (0.1, 0.5, 0.6)
    assert c.verdict.better == "higher" and c.verdict.gain == pytest.approx(0.2) and c.verdict.b_pays
    assert c.to_json()["sides"]["A"]["answer_f1"] == 0.5
    fake_train(b, home)  # a newer version of B without a learning report
    c = cmp.compare(a, b, home, metric="answer_f1", min_gain=0.05)
    assert c.b.answer_f1 is None and c.verdict.gain is None and not c.verdict.b_pays
    assert "answer_f1 is missing" in c.verdict.reason


def test_compare_notes_a_stale_side_and_train_retrains_it(
    home: Path, tmp_path: Path, no_torch_scoring, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlm.plan import hardware
    from dlm.train import device, runs

    a, b = write_doc(tmp_path / "a.dlm", ID_A), write_doc(tmp_path / "b.dlm", ID_B, adapter="dora")
    fake_train(a, home)
    with pytest.raises(DlmError, match="B has no trained adapter"):
        cmp.compare(a, b, home)
    trained: list = []
    monkeypatch.setattr(device, "probe", hardware.probe_light)  # no torch for the training hardware
    monkeypatch.setattr(
        runs,
        "train_document",
        lambda path, home_, hw, **kw: (
            trained.append((path, kw)) or SimpleNamespace(version=fake_train(Path(path), home_))
        ),
    )
    asked: list = []
    c = cmp.compare(a, b, home, train=True, on_train=lambda role, path, why: asked.append((role, why)) or {})
    assert [p for p, _ in trained] == [str(b)] and asked == [("B", "it has no adapter yet")]
    assert c.notes == ("trained B: it has no adapter yet",)

    # an edit outside the corpus (a comment) makes A stale but keeps the data identical
    a.write_text(a.read_text().replace("max_steps: 3\n", "max_steps: 3  # edited\n"))
    c = cmp.compare(a, b, home)
    assert c.a.stale and not c.b.stale and any("A is stale" in n for n in c.notes)
    assert c.a.version == "v0001" and len(trained) == 1  # without --train nothing is retrained
    c = cmp.compare(a, b, home, train=True)
    assert [Path(p).name for p, _ in trained] == ["b.dlm", "a.dlm"] and c.a.version == "v0002" and not c.a.stale


def test_compare_stops_when_training_is_interrupted(
    home: Path, tmp_path: Path, no_torch_scoring, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlm.errors import RunError
    from dlm.plan import hardware
    from dlm.train import device, runs

    a, b = write_doc(tmp_path / "a.dlm", ID_A), write_doc(tmp_path / "b.dlm", ID_B, adapter="dora")
    fake_train(a, home)
    monkeypatch.setattr(device, "probe", hardware.probe_light)
    monkeypatch.setattr(
        runs, "train_document", lambda *a, **kw: SimpleNamespace(version=None, summary=SimpleNamespace(steps=2))
    )
    with pytest.raises(RunError, match="training B stopped at step 2") as info:
        cmp.compare(a, b, home, train=True)
    assert info.value.exit_code == 1 and "--resume" in info.value.hint and not no_torch_scoring


def test_compare_and_plot_import_nothing_heavy() -> None:
    code = (
        "import sys, dlm.use.compare, dlm.use.verdict, dlm.cli.plot\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'matplotlib', 'rich') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert res.stdout.strip() == ""


# ---------------------------------------------------------------- integration: twins on the tiny model

from tests.test_commands import dlm  # noqa: E402  (one CLI runner for every test file)

TINY_QA = "\n".join(
    f"### Q\nWhat is item {i}?\n### A\nItem {i} is number {i * 7} in the catalogue.\n" for i in range(12)
)


def tiny_doc(folder: Path, name: str, dlm_id: str, adapter: str, *, qa: str = TINY_QA) -> Path:
    """A twin on the tiny base: CPU-friendly knobs, a held-out share large enough to score."""
    path = folder / name
    path.write_text(f"""---
dlm_id: {dlm_id}
base_model: ./tiny
system_prompt: Answer briefly.
training:
  adapter: {adapter}
  max_steps: 4
  micro_batch_size: 2
  grad_accum: 1
  sequence_len: 64
  precision: fp32
  gradient_checkpointing: false
  learning_rate: 1.0e-3
  logging_steps: 1
  eval_fraction: 0.25
---
# Catalogue

Every item in the catalogue has a number seven times its index.

::instruction::
{qa}
""")
    return path


run_dlm = dlm  # the same CLI runner as tests/test_commands.py


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """LoRA (A) and DoRA (B) twins, each trained by its own `dlm train` process (fair peak-memory figures)."""
    from tests.tinymodel import tiny_base

    folder, home = tmp_path_factory.mktemp("twins"), tmp_path_factory.mktemp("home")
    tiny_base(folder / "tiny")
    a = tiny_doc(folder, "a.dlm", ID_A, "lora")
    b = tiny_doc(folder, "b.dlm", ID_B, "dora")
    for doc in (a, b):
        run_dlm("train", doc.name, home=home, cwd=folder)
    return folder, home, a, b


def assert_all_finite(data: dict) -> None:
    check_shape(data)
    for role in ("base", "A", "B"):
        s = data["sides"][role]
        for key in ("eval_loss", "perplexity", "delta_kl"):
            assert isinstance(s[key], float) and math.isfinite(s[key]), (role, key, s[key])
    for role in ("A", "B"):
        s = data["sides"][role]
        assert s["delta_kl"] > 0, role  # a trained adapter moved the model
        for key in (
            "steady_step_seconds",
            "train_seconds",
            "peak_memory_bytes",
            "trainable_params",
            "adapter_bytes",
            "steps",
        ):
            assert isinstance(s[key], (int, float)) and s[key] > 0 and math.isfinite(s[key]), (role, key, s[key])
    assert data["sides"]["A"]["adapter"] == "lora" and data["sides"]["B"]["adapter"] == "dora"
    for key in ("step_time_ratio", "memory_ratio", "train_time_ratio", "params_ratio", "adapter_bytes_ratio"):
        assert data["verdict"][key] > 0, key


@pytest.mark.integration
def test_cli_gate_exit_codes_both_ways_with_json_and_plot(twins) -> None:
    folder, home, a, b = twins
    proc = run_dlm(
        "compare",
        a.name,
        b.name,
        "--gate",
        "--min-gain",
        "0.99",
        "--json",
        "--plot",
        "out/cmp.png",
        home=home,
        cwd=folder,
        check=1,
    )
    data = json.loads(proc.stdout)
    assert_all_finite(data)
    assert data["verdict"]["b_pays"] is False and data["verdict"]["keep"] == "A" and data["data"]["same"] is True
    assert [d["key"] for d in data["config_diff"] if d["source"] == "spec"] == ["training.adapter"]
    assert data["sides"]["B"]["trainable_params"] > data["sides"]["A"]["trainable_params"]  # DoRA's magnitudes
    assert (folder / "out" / "cmp.png").read_bytes()[:4] == b"\x89PNG"

    proc = run_dlm("compare", a.name, b.name, "--gate", "--min-gain", "-1", home=home, cwd=folder, check=0)
    for needle in (
        "A = a.dlm (v0001, lora)",
        "B = b.dlm (v0001, dora)",
        " base ",
        "loss",
        "ppl",
        "delta_kl",
        "s/step",
        "peak mem",
        "trainable",
        "training.adapter",
        "verdict: keep B",
    ):
        assert needle in proc.stdout, needle


@pytest.mark.integration
def test_scores_match_what_training_measured(twins) -> None:
    """compare's loss for A and the base equals the trainer's own held-out evaluation (same tokens, same mask)."""
    folder, home, a, b = twins
    c = cmp.compare(a, b, home, metric="delta_kl", min_gain=0.05)
    summary = json.loads((home / "store" / ID_A / "versions" / "v0001" / "summary.json").read_text())
    assert c.a.eval_loss == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert c.base.eval_loss == pytest.approx(summary["base_eval_loss"], rel=1e-4)
    assert c.verdict.metric == "delta_kl" and c.verdict.a_value == c.a.delta_kl and c.notes == ()
    assert_all_finite(c.to_json())


@pytest.mark.integration
def test_cli_refuses_twins_whose_corpora_differ(twins, tmp_path: Path) -> None:
    folder, home, a, _ = twins
    other = tiny_doc(folder, "c.dlm", ID_C, "dora", qa=TINY_QA.replace("catalogue", "register"))
    proc = run_dlm("compare", a.name, other.name, home=home, cwd=folder, check=2)
    assert "other examples" in proc.stderr and "--allow-different-data" in proc.stderr
    assert not (home / "store" / ID_C).exists()  # refused before anything was written


@pytest.mark.integration
def test_train_flag_trains_missing_sides_in_process(twins, tmp_path: Path) -> None:
    """compare(train=True) through runs.train_document: both sides trained, then judged; a second call reuses them."""
    folder, _, _, _ = twins
    home = tmp_path / "home"
    a = tiny_doc(folder, "ta.dlm", "01KAV3J8ZP4N6Q2R7S9T0W1X3A", "lora")
    b = tiny_doc(folder, "tb.dlm", "01KAV3J8ZP4N6Q2R7S9T0W1X3B", "dora")
    c = cmp.compare(a, b, home, train=True)
    assert "trained A: it has no adapter yet" in c.notes and "trained B: it has no adapter yet" in c.notes
    assert c.a.version == c.b.version == "v0001"
    assert_all_finite(c.to_json())
    again = cmp.compare(a, b, home, train=True)
    assert again.notes == () and again.a.eval_loss == pytest.approx(c.a.eval_loss)
