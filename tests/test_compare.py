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
from dlm.use.verdict import (
    Comparison,
    Side,
    bootstrap_interval,
    bootstrap_seeds_interval,
    check_options,
    config_diff,
    decide,
    examples_needed,
    perplexity,
    relative_gain,
)

REPO = Path(__file__).resolve().parent.parent
ID_A, ID_B, ID_C = "01KAV3J8ZP4N6Q2R7S9T0W1X2A", "01KAV3J8ZP4N6Q2R7S9T0W1X2B", "01KAV3J8ZP4N6Q2R7S9T0W1X2C"
ID_D = "01KAV3J8ZP4N6Q2R7S9T0W1X2D"


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


def judge(metric: str, min_gain: float, a: Side, b: Side, n: int = 20):
    """decide() with n identical examples per side: the bootstrap interval is the point gain itself,
    so these tests pin the rule at the interval's ends; the spread is tested further down."""
    av, bv = getattr(a, metric), getattr(b, metric)
    paired = ([av] * n, [bv] * n) if av is not None and bv is not None else None
    return decide(metric, min_gain, a, b, paired)


def test_eval_loss_gain_below_min_keeps_a() -> None:
    v = judge("eval_loss", 0.05, side("A", 2.0), side("B", 1.95))
    assert v.gain == pytest.approx(0.025) and not v.b_pays and v.keep == "A" and v.better == "lower"
    assert v.reason.startswith("keep A:") and "all below the 5.0% min gain" in v.reason and v.outcome == "keep A"


def test_eval_loss_gain_at_or_above_min_keeps_b() -> None:
    v = judge("eval_loss", 0.05, side("A", 2.0), side("B", 1.8))
    assert (
        v.gain == pytest.approx(0.1)
        and v.b_pays
        and v.keep == "B"
        and v.reason.startswith("B pays:")
        and v.outcome == "B pays"
    )
    # exactly 5%: (2.0 - 1.9) / 2.0 is 0.04999999999999993 in floats; "at least" must still hold
    assert judge("eval_loss", 0.05, side("A", 2.0), side("B", 1.9)).b_pays


def test_b_worse_never_pays_at_a_positive_min_gain() -> None:
    v = judge("eval_loss", 0.05, side("A", 2.0), side("B", 2.4))
    assert v.gain == pytest.approx(-0.2) and not v.b_pays


def test_zero_min_gain_counts_a_tie_as_paying() -> None:
    assert judge("eval_loss", 0.0, side("A", 2.0), side("B", 2.0)).b_pays
    assert not judge("eval_loss", 0.0, side("A", 2.0), side("B", 2.0000001)).b_pays


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
    assert judge("eval_loss", min_gain, side("A", 2.0), side("B", b_loss)).b_pays is pays


def test_delta_kl_higher_is_better() -> None:
    v = judge("delta_kl", 0.05, side("A", kl=0.10), side("B", kl=0.12))
    assert v.better == "higher" and v.gain == pytest.approx(0.2) and v.b_pays
    v = judge("delta_kl", 0.05, side("A", kl=0.10), side("B", kl=0.09))
    assert v.gain == pytest.approx(-0.1) and not v.b_pays
    # the metric is the one judged: B's better loss does not matter under delta_kl
    assert not judge("delta_kl", 0.05, side("A", 3.0, 0.1), side("B", 1.0, 0.1)).b_pays


def test_delta_kl_of_zero_at_a() -> None:
    v = judge("delta_kl", 1.0, side("A", kl=0.0), side("B", kl=0.01))
    assert v.gain == math.inf and v.b_pays and v.to_json()["gain"] is None and v.to_json()["b_pays"] is True
    assert relative_gain("delta_kl", 0.0, 0.0) == 0.0
    assert judge("delta_kl", 0.0, side("A", kl=0.0), side("B", kl=0.0)).b_pays
    assert not judge("delta_kl", 0.05, side("A", kl=0.0), side("B", kl=0.0)).b_pays


def test_missing_or_non_finite_metric_keeps_a() -> None:
    for a, b in ((None, 1.0), (1.0, None), (math.nan, 1.0), (1.0, math.inf)):
        v = judge("eval_loss", -1.0, side("A", a), side("B", b))
        assert v.gain is None and not v.b_pays and v.keep == "A" and "missing" in v.reason


def test_cost_ratios_are_b_over_a_and_named_in_the_reason() -> None:
    v = judge(
        "eval_loss",
        0.05,
        side("A", step=2.0, mem=1000, seconds=20.0, params=100, size=400),
        side("B", step=2.76, mem=1100, seconds=30.0, params=110, size=440),
    )
    assert v.step_time_ratio == pytest.approx(1.38) and v.memory_ratio == pytest.approx(1.1)
    assert v.train_time_ratio == pytest.approx(1.5) and v.params_ratio == pytest.approx(1.1)
    assert v.adapter_bytes_ratio == pytest.approx(1.1)
    assert "x1.38 step time" in v.reason and "x1.10 peak memory" in v.reason
    assert v.gain_per_extra_train_second == pytest.approx(v.gain / 10.0)  # 30 s vs 20 s of training
    unknown = judge("eval_loss", 0.05, side("A", step=None, mem=0), side("B"))
    assert unknown.step_time_ratio is None and unknown.memory_ratio is None and "unknown" in unknown.reason


# ---------------------------------------------------------------- the paired bootstrap


def noisy(n: int, a_mean: float, gain: float, spread: float, seed: int = 1) -> tuple[list[float], list[float]]:
    """n examples: A's per-example loss around a_mean; B's is A's times (1 - gain) plus independent noise."""
    import random

    rng = random.Random(seed)
    a = [a_mean * (1 + rng.uniform(-0.5, 0.5)) for _ in range(n)]
    b = [x * (1 - gain) + rng.gauss(0, spread) for x in a]
    return a, b


def decide_on(metric: str, min_gain: float, paired: tuple[list[float], list[float]]):
    a, b = paired
    return decide(metric, min_gain, side("A", sum(a) / len(a)), side("B", sum(b) / len(b)), paired)


def test_bootstrap_three_outcomes_with_the_interval_in_the_reason() -> None:
    clear = decide_on("eval_loss", 0.05, noisy(200, 2.0, 0.15, 0.1))
    assert clear.outcome == "B pays" and clear.b_pays and clear.keep == "B"
    assert 0.05 < clear.gain_low < clear.gain < clear.gain_high and "all at or above" in clear.reason
    worse = decide_on("eval_loss", 0.05, noisy(200, 2.0, -0.1, 0.1))
    assert worse.outcome == "keep A" and not worse.b_pays and worse.gain_high < 0.05
    noise = decide_on("eval_loss", 0.05, noisy(12, 2.0, 0.05, 0.6))
    assert noise.outcome == "inconclusive" and not noise.b_pays and noise.keep == "A"
    assert noise.gain_low < 0.05 < noise.gain_high and "straddling the 5.0% min gain" in noise.reason
    assert f"{noise.gain_low:+.2%} to {noise.gain_high:+.2%} (95% interval)" in noise.reason
    assert (noise.resamples, noise.level, noise.examples) == (2000, 0.95, 12)


def test_bootstrap_is_reproducible_and_resamples_examples() -> None:
    a, b = noisy(30, 2.0, 0.08, 0.3)
    assert bootstrap_interval("eval_loss", a, b) == bootstrap_interval("eval_loss", a, b)
    assert bootstrap_interval("eval_loss", a, b) != bootstrap_interval("eval_loss", a, b, seed=1)
    # one example carries the whole difference: resampling examples makes the interval reach 0
    low, high = bootstrap_interval("eval_loss", [2.0] * 19 + [20.0], [2.0] * 19 + [10.0])
    assert low == 0.0 and high > 0.3
    assert bootstrap_interval("eval_loss", [2.0], [1.0]) is None  # one example: nothing to resample
    assert bootstrap_interval("eval_loss", [2.0, 2.0], [1.0]) is None


def test_examples_needed_follows_one_over_root_n() -> None:
    a, b = noisy(20, 2.0, 0.1, 0.8, seed=4)
    v = decide_on("eval_loss", 0.05, (a, b))
    assert v.outcome == "inconclusive" and v.examples_needed > 20
    half = (v.gain_high - v.gain_low) / 2
    assert v.examples_needed == math.ceil(20 * (half / (v.gain - 0.05)) ** 2)
    # the same examples four times over: the interval is about half as wide
    big = decide_on("eval_loss", 0.05, (a * 4, b * 4))
    assert (big.gain_high - big.gain_low) == pytest.approx(half, rel=0.2)
    assert examples_needed(0.05, 0.0, 0.1, 0.05, 20) is None and examples_needed(None, 0, 1, 0.05, 5) is None


def test_inconclusive_note_says_how_many_examples(tmp_path: Path) -> None:
    a, b = noisy(20, 2.0, 0.1, 0.8, seed=4)
    scores = {**SCORES, "per_example": {"tokens": [1] * 20, "loss_sum": {"A": a, "B": b}, "kl_sum": {}}}
    scores["loss"] = {"base": 3.0, "A": sum(a) / 20, "B": sum(b) / 20}
    fa = write_version(tmp_path / "a" / "v0001", spec(ID_A), step=1.0, mem=2_000_000)
    fb = write_version(tmp_path / "b" / "v0001", spec(ID_B, adapter="dora"), step=1.3, mem=2_100_000)
    c = cmp.assemble(fa, fb, "a.dlm", "b.dlm", scores, base_name="b", metric="eval_loss", min_gain=0.05)
    assert c.verdict.outcome == "inconclusive"
    assert c.notes == (
        f"about {c.verdict.examples_needed} held-out examples like these (now 20) would put the interval of "
        f"the observed gain {c.verdict.gain:+.2%} clear of the 5.0% min gain",
    )
    check_shape(json.loads(json.dumps(c.to_json())))


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
    "exact_match": (float, type(None)),
    "seed": (int, type(None)),
    "pref_accuracy": (float, type(None)),
    "reward_margin": (float, type(None)),
    "scored_on": (str, type(None)),
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
    "outcome": str,
    "gain_low": (float, type(None)),
    "gain_high": (float, type(None)),
    "level": float,
    "resamples": int,
    "examples": (int, type(None)),
    "examples_needed": (int, type(None)),
    "gain_per_extra_train_second": (float, type(None)),
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
        "seeds",
    }
    assert set(data["seeds"]) <= {"A", "B"}
    for s in data["seeds"].values():
        assert set(s) == {"seeds", "versions", "values", "mean", "sd"} and len(s["versions"]) == len(s["values"])
        assert (s["sd"] is None) is (len(s["values"]) < 2 or s["mean"] is None)
    assert data["dlm_compare"] == 2 and data["metric"] in ("eval_loss", "delta_kl", "answer_f1", "exact_match")
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
    assert data["verdict"]["outcome"] in ("B pays", "keep A", "inconclusive")
    assert data["verdict"]["b_pays"] is (data["verdict"]["outcome"] == "B pays")
    low, high = data["verdict"]["gain_low"], data["verdict"]["gain_high"]
    assert (low is None) is (high is None) and (low is None or low <= high)
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


SCORES = {
    "examples": 3,
    "tokens": 57,
    "loss": {"base": 3.2, "A": 2.4, "B": 2.2},
    "delta_kl": {"A": 0.31, "B": 0.36},
    # three examples of 19 tokens, each with the mean's loss and KL: a tight interval around the gain
    "per_example": {
        "tokens": [19, 19, 19],
        "loss_sum": {"base": [3.2 * 19] * 3, "A": [2.4 * 19] * 3, "B": [2.2 * 19] * 3},
        "kl_sum": {"A": [0.31 * 19] * 3, "B": [0.36 * 19] * 3},
    },
}


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
    assert c.verdict.gain == pytest.approx(0.2 / 2.4) and c.verdict.keep == "B" and c.verdict.outcome == "B pays"
    assert c.verdict.gain_low == pytest.approx(0.2 / 2.4) == pytest.approx(c.verdict.gain_high) and c.notes == ()
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
        "verdict: B pays",
        "95% interval +8.33% to +8.33%",
    ):
        assert needle in text, needle
    assert "…" not in text  # nothing truncated


def test_twin_check_accepts_every_outcome_and_refuses_a_mismatch(comparison: Comparison) -> None:
    """bench/twin_check.py (make twin) checks structure, never who wins: each outcome passes; an outcome
    that disagrees with b_pays, or an interval missing, does not."""
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("twin_check", REPO / "bench" / "twin_check.py")
    assert spec_ is not None and spec_.loader is not None
    twin_check = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(twin_check)
    data = json.loads(json.dumps(comparison.to_json()))
    data["sides"]["B"]["trainable_params"] = 1100  # DoRA's magnitudes
    v = data["verdict"]
    for outcome, pays in (("B pays", True), ("keep A", False), ("inconclusive", False)):
        case = json.loads(json.dumps(data))
        case["verdict"] |= {"outcome": outcome, "b_pays": pays, "keep": "B" if pays else "A"}
        case["verdict"]["reason"] = v["reason"].replace("B pays", outcome)
        twin_check.check_numbers(case)
    for change in ({"b_pays": False, "keep": "A"}, {"gain_low": None}):
        case = json.loads(json.dumps(data))
        case["verdict"] |= change
        with pytest.raises((AssertionError, TypeError)):
            twin_check.check_numbers(case)


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


def fake_train(
    path: Path,
    home: Path,
    heldout_f1: tuple[float, float] | None = None,
    *,
    legacy: bool = False,
    seed: int | None = None,
) -> str:
    """What runs.train_document leaves behind, without training: a committed version with its documents
    (`legacy`: as versions were recorded before the split record, drawn with the training seed)."""
    from dlm.plan import hardware
    from dlm.plan.prepare import prepare
    from dlm.store import current
    from dlm.store.opening import open_store

    prepared = prepare(path, hardware.probe_light(), training_overrides={"seed": seed} if seed is not None else None)
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
        **({"split": {"rule": "content", "heldout": [e.id for e in prepared.heldout]}} if not legacy else {}),
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
                    {
                        "metrics": {
                            "learning": {
                                "heldout": {"n": 2, "f1": heldout_f1[0], "base_f1": heldout_f1[1], "exact": 1},
                                # the training sample first, then the two held-out answers
                                "answers": [
                                    {"id": "t1", "f1": 0.0, "exact": False},
                                    *({"id": q, "f1": heldout_f1[0], "exact": q == "q1"} for q in ("q1", "q2")),
                                ],
                            }
                        }
                    }
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
        n = len(list(examples))
        # each further seed ("A1", "B2", ...) scores 0.01 worse per index than the side's first
        loss = {"base": SCORES["loss"]["base"]} | {k: SCORES["loss"][k[0]] + 0.01 * int(k[1:] or 0) for k in adapters}
        kl = {k: SCORES["delta_kl"][k[0]] for k in adapters}
        per = {
            "tokens": [19] * n,
            "loss_sum": {k: [v * 19] * n for k, v in loss.items()},
            "kl_sum": {k: [v * 19] * n for k, v in kl.items()},
        }
        return {**SCORES, "loss": loss, "delta_kl": kl, "examples": n, "per_example": per}

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
    assert c.verdict.metric == "delta_kl" and c.verdict.gain == pytest.approx(0.05 / 0.31)
    # one held-out example: nothing to resample, so however large the gain, no interval and no `B pays`
    assert c.verdict.outcome == "inconclusive" and not c.verdict.b_pays and c.verdict.gain_low is None
    assert [d.key for d in c.differences] == ["training.adapter"]  # plan.adapter only echoes it
    assert not c.a.stale and not c.b.stale and c.same_data
    assert c.notes == ("no per-example delta_kl figures to resample, so the gain has no interval",)
    check_shape(c.to_json())


DRAWN = "::instruction::\n" + "".join(f"### Q\nWhat is code {i}?\n### A\nCode {i} is {i * 3}.\n" for i in range(40))


def test_two_seeds_of_one_document_share_the_heldout_set_and_compare(
    home: Path, tmp_path: Path, no_torch_scoring
) -> None:
    a = write_doc(tmp_path / "a.dlm", ID_A, body=DRAWN, extra="  seed: 1\n")
    b = write_doc(tmp_path / "b.dlm", ID_B, body=DRAWN, extra="  seed: 2\n")
    fake_train(a, home), fake_train(b, home)
    c = cmp.compare(a, b, home)  # no --allow-different-data
    assert c.same_data and [d.key for d in c.differences] == ["training.seed"]
    ((_, _, scored, _),) = no_torch_scoring
    assert len(scored) >= 2 and c.verdict.examples == len(scored) and c.heldout_examples == len(scored)


def test_a_version_recorded_before_the_split_record_is_scored_on_the_split_it_trained_on(
    home: Path, tmp_path: Path, no_torch_scoring
) -> None:
    """An old version (no `split` in its summary) held out the training seed's draw: compare scores
    that one, not today's content draw, which may include examples it trained on."""
    from dlm.plan import corpus, hardware
    from dlm.plan.prepare import prepare

    a = write_doc(tmp_path / "a.dlm", ID_A, body=DRAWN, extra="  seed: 5\n")
    b = write_doc(tmp_path / "b.dlm", ID_B, body=DRAWN, adapter="dora", extra="  seed: 5\n")
    fake_train(a, home, legacy=True), fake_train(b, home, legacy=True)
    cmp.compare(a, b, home)
    prepared = prepare(a, hardware.probe_light())
    old = corpus.legacy_split(corpus.examples(prepared.doc), 5, 0.1)[1]
    assert [e.id for e in no_torch_scoring[-1][2]] == [e.id for e in old]
    assert {e.id for e in old} != {e.id for e in prepared.heldout}  # the rules do differ on this document
    fake_train(a, home)  # a new version of A records its split: that one is scored
    cmp.compare(a, b, home, allow_different_data=True)
    assert [e.id for e in no_torch_scoring[-1][2]] == [e.id for e in prepared.heldout]


def test_compare_judges_on_the_learning_reports_answer_f1(home: Path, tmp_path: Path, no_torch_scoring) -> None:
    """`--metric answer_f1`: each version's held-out answer F1 from its metrics.json (the base's from A's);
    a version without a learning report leaves the metric missing, never a guess."""
    a, b = write_doc(tmp_path / "a.dlm", ID_A), write_doc(tmp_path / "b.dlm", ID_B, adapter="dora")
    fake_train(a, home, heldout_f1=(0.5, 0.1)), fake_train(b, home, heldout_f1=(0.6, 0.1))
    c = cmp.compare(a, b, home, metric="answer_f1", min_gain=0.05)
    assert (c.base.answer_f1, c.a.answer_f1, c.b.answer_f1) == (0.1, 0.5, 0.6)
    assert c.verdict.better == "higher" and c.verdict.gain == pytest.approx(0.2) and c.verdict.b_pays
    assert c.verdict.examples == 2 and c.verdict.gain_low == pytest.approx(0.2)  # paired by question id
    assert c.to_json()["sides"]["A"]["answer_f1"] == 0.5 and c.a.exact_match == 0.5
    e = cmp.compare(a, b, home, metric="exact_match", min_gain=0.0)  # both answer q1 exactly: a tie pays at 0
    assert e.verdict.gain == 0.0 and e.verdict.outcome == "B pays" and e.base.exact_match is None
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
    assert c.notes[0] == "trained B: it has no adapter yet"

    # an edit outside the corpus (a comment) makes A stale but keeps the data identical
    a.write_text(a.read_text().replace("max_steps: 3\n", "max_steps: 3  # edited\n"))
    c = cmp.compare(a, b, home)
    assert c.a.stale and not c.b.stale and any("A is stale" in n for n in c.notes)
    assert c.a.version == "v0001" and len(trained) == 1  # without --train nothing is retrained
    c = cmp.compare(a, b, home, train=True)
    assert [Path(p).name for p, _ in trained] == ["b.dlm", "a.dlm"] and c.a.version == "v0002" and not c.a.stale


def test_seeds_trains_the_missing_seeds_scores_them_all_and_keeps_the_current_version(
    home: Path, tmp_path: Path, no_torch_scoring, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlm.plan import hardware
    from dlm.store.opening import open_store
    from dlm.train import device, runs

    a = write_doc(tmp_path / "a.dlm", ID_A, body=DRAWN)
    b = write_doc(tmp_path / "b.dlm", ID_B, adapter="dora", body=DRAWN)
    fake_train(a, home), fake_train(b, home)
    with pytest.raises(DlmError, match="A has no version trained with seeds 43, 44") as info:
        cmp.compare(a, b, home, seeds=3)
    assert info.value.exit_code == 2 and "--train" in info.value.hint and "--seed 43" in info.value.hint
    trained: list = []

    def train(path, home_, hw, *, seed=None, **kw):
        trained.append((Path(path).name, seed))
        version = fake_train(Path(path), home_, seed=seed)
        dlm_id = ID_A if Path(path).name == "a.dlm" else ID_B
        return SimpleNamespace(version=version, store=open_store(home_, dlm_id, Path(path), "smollm2-135m"))

    monkeypatch.setattr(device, "probe", hardware.probe_light)
    monkeypatch.setattr(runs, "train_document", train)
    c = cmp.compare(a, b, home, seeds=3, train=True)
    assert trained == [("a.dlm", 43), ("a.dlm", 44), ("b.dlm", 43), ("b.dlm", 44)]
    adapters = no_torch_scoring[-1][1]
    assert set(adapters) == {"A", "A1", "A2", "B", "B1", "B2"} and adapters["A2"].name == "v0003"
    data = c.to_json()
    check_shape(data)
    assert data["seeds"]["A"]["seeds"] == [42, 43, 44] and data["seeds"]["A"]["versions"] == ["v0001", "v0002", "v0003"]
    assert data["seeds"]["A"]["values"] == pytest.approx([2.4, 2.41, 2.42]) and data["seeds"]["A"][
        "sd"
    ] == pytest.approx(0.01)
    assert c.a.eval_loss == pytest.approx(2.41) and c.b.eval_loss == pytest.approx(2.21)  # the rows: seed means
    assert c.verdict.gain == pytest.approx(0.2 / 2.41) and c.verdict.examples == c.heldout_examples
    assert any(n.startswith("eval_loss over seeds: A 2.41 (sd 0.01, seeds 42, 43, 44)") for n in c.notes)
    assert "trained A with seed 43" in c.notes
    for dlm_id, doc in ((ID_A, a), (ID_B, b)):  # the document's own version stays current
        assert open_store(home, dlm_id, doc, "smollm2-135m", readonly=True).current_version().name == "v0001"
    again = cmp.compare(a, b, home, seeds=3)  # found in the stores now: nothing trained
    assert len(trained) == 4 and again.to_json()["seeds"] == data["seeds"]
    for bad in (0, 21):
        with pytest.raises(DlmError, match="--seeds must be"):
            cmp.compare(a, b, home, seeds=bad)


def test_seed_spread_widens_the_interval() -> None:
    base_a, base_b = noisy(40, 2.0, 0.08, 0.2, seed=2)
    calm = bootstrap_seeds_interval("eval_loss", [base_a, base_a], [base_b, base_b])
    # B's two seeds disagree by 10% on every example: the same means, a wider interval
    shaky = bootstrap_seeds_interval(
        "eval_loss", [base_a, base_a], [[x * 0.9 for x in base_b], [x * 1.1 for x in base_b]]
    )
    assert calm is not None and shaky is not None and shaky[1] - shaky[0] > 1.5 * (calm[1] - calm[0])
    one = decide("eval_loss", 0.05, side("A", 2.0), side("B", 1.9), seeds=([base_a], [base_b]))
    assert (one.gain_low, one.gain_high) == bootstrap_interval("eval_loss", base_a, base_b)


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
        "verdict: B pays",  # -1 tolerates B up to twice A's loss: the whole interval clears it
        "paired bootstrap, 2000 resamples of 3 examples",
    ):
        assert needle in proc.stdout, needle

    # a min gain inside the interval: inconclusive, which --gate fails unless told to pass it
    low, high = data["verdict"]["gain_low"], data["verdict"]["gain_high"]
    assert low < data["verdict"]["gain"] < high  # three examples of a 4-step run do differ
    middle = f"{(low + high) / 2:.6f}"
    proc = run_dlm("compare", a.name, b.name, "--gate", "--min-gain", middle, "--json", home=home, cwd=folder, check=1)
    assert json.loads(proc.stdout)["verdict"]["outcome"] == "inconclusive"
    args = ("compare", a.name, b.name, "--gate", "--min-gain", middle, "--inconclusive", "pass")
    assert "verdict: inconclusive" in run_dlm(*args, home=home, cwd=folder, check=0).stdout
    proc = run_dlm("compare", a.name, b.name, "--inconclusive", "maybe", home=home, cwd=folder, check=2)
    assert "--inconclusive must be fail or pass" in proc.stderr


@pytest.mark.integration
def test_scores_match_what_training_measured(twins) -> None:
    """compare's loss for A and the base equals the trainer's own held-out evaluation (same tokens, same mask)."""
    folder, home, a, b = twins
    c = cmp.compare(a, b, home, metric="delta_kl", min_gain=0.05)
    summary = json.loads((home / "store" / ID_A / "versions" / "v0001" / "summary.json").read_text())
    assert c.a.eval_loss == pytest.approx(summary["eval_loss"], rel=1e-4)
    assert c.base.eval_loss == pytest.approx(summary["base_eval_loss"], rel=1e-4)
    assert c.verdict.metric == "delta_kl" and c.verdict.a_value == c.a.delta_kl
    assert all(n.startswith("about ") for n in c.notes)  # at most the examples-needed note
    assert_all_finite(c.to_json())
    # the per-example figures the bootstrap resamples add up to the same means
    from dlm.store import current
    from dlm.train import basefolder
    from dlm.use import infer

    cur = current.current(a, home)
    held = cmp.trained_split(cur)[1]
    versions = {"A": cur.version_dir, "B": home / "store" / ID_B / "versions" / "v0001"}
    scores = infer.score_adapters(basefolder.materialize(cur.prepared.base, home), versions, held, max_length=64)
    per = scores["per_example"]
    assert len(per["tokens"]) == len(held) == c.heldout_examples and sum(per["tokens"]) == scores["tokens"]
    for role in ("base", "A", "B"):
        assert sum(per["loss_sum"][role]) / scores["tokens"] == pytest.approx(scores["loss"][role], rel=1e-5)
    assert sum(per["kl_sum"]["B"]) / scores["tokens"] == pytest.approx(scores["delta_kl"]["B"], rel=1e-4, abs=1e-7)


@pytest.mark.integration
def test_a_learning_rate_ten_times_too_low_is_resolved(twins) -> None:
    """The acceptance case: the same document with a learning rate 10x lower on B is `keep A`, with an
    interval wholly below the min gain (the held-out examples all say so), not `inconclusive`."""
    folder, home, a, _ = twins
    slow = folder / "slow.dlm"
    slow.write_text(a.read_text().replace(ID_A, ID_D).replace("learning_rate: 1.0e-3", "learning_rate: 1.0e-4"))
    run_dlm("train", slow.name, home=home, cwd=folder)
    data = json.loads(run_dlm("compare", a.name, slow.name, "--json", home=home, cwd=folder).stdout)
    v = data["verdict"]
    assert v["outcome"] == "keep A" and v["gain_high"] < 0.05 and data["data"]["same"] is True, v
    assert [d["key"] for d in data["config_diff"] if d["source"] == "spec"] == ["training.learning_rate"]


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
    assert all(n.startswith("about ") for n in again.notes) and again.a.eval_loss == pytest.approx(c.a.eval_loss)


@pytest.mark.integration
def test_train_seed_adds_one_more_seed_without_editing_the_file(twins, tmp_path: Path) -> None:
    """`dlm train FILE --seed S`: a new version of the same store, trained with S and recorded as such,
    on the document's own held-out set; a seed outside 0..2^32-1 is refused before anything runs."""
    folder, _, a, _ = twins
    home = tmp_path / "home"
    text = a.read_text()
    run_dlm("train", a.name, "--seed", "7", home=home, cwd=folder)
    assert a.read_text() == text
    version = home / "store" / ID_A / "versions" / "v0001"
    spec_json = json.loads((version / "spec.json").read_text())
    summary = json.loads((version / "summary.json").read_text())
    assert spec_json["training"]["seed"] == 7 and (summary["seed"], summary["seed_from"]) == (7, "--seed")
    manifest = json.loads((home / "store" / ID_A / "manifest.json").read_text())
    assert [r["seed"] for r in manifest["runs"]] == [7]
    from dlm.plan import hardware
    from dlm.plan.prepare import prepare

    assert summary["split"]["heldout"] == [e.id for e in prepare(a, hardware.probe_light()).heldout]
    proc = run_dlm("train", a.name, "--seed", "-1", home=home, cwd=folder, check=2)
    assert "--seed" in proc.stderr and len(manifest["runs"]) == 1


@pytest.mark.integration
def test_cli_seeds_trains_one_more_seed_per_side_and_judges_all_four(twins) -> None:
    from dlm.store.opening import open_store

    folder, home, a, b = twins
    proc = run_dlm("compare", a.name, b.name, "--seeds", "2", "--train", "--json", home=home, cwd=folder)
    data = json.loads(proc.stdout)
    assert_all_finite(data)
    for role, dlm_id in (("A", ID_A), ("B", ID_B)):
        s = data["seeds"][role]
        assert s["seeds"] == [42, 43] and s["versions"][0] == "v0001" and s["sd"] > 0, s
        assert data["sides"][role]["eval_loss"] == pytest.approx(sum(s["values"]) / 2)
        doc = a if role == "A" else b
        store = open_store(home, dlm_id, doc, "./tiny", readonly=True)
        assert store.current_version().name == "v0001"  # still the document's own seed
    assert "trained A with seed 43" in data["notes"] and data["verdict"]["examples"] == data["heldout"]["examples"]
    again = json.loads(run_dlm("compare", a.name, b.name, "--seeds", "2", "--json", home=home, cwd=folder).stdout)
    assert again["seeds"] == data["seeds"] and not any(n.startswith("trained") for n in again["notes"])
