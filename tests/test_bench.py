"""bench/harness.py: the ratios and targets from run results (unit), and the worker on a tiny model (integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import harness, report
from bench import results as figures


def _result(kind: str, adapter: str, dropout: float, tps: float, loss: float = 2.0, **extra) -> dict:
    r = {
        "config": {"kind": kind, "adapter": adapter, "dropout": dropout, "steps": 40},
        "tokens_per_s": tps,
        "steady_s": 1.0,
        "eval_loss": loss,
        "peak_bytes": 2 * 2**30,
        "real_total_s": 100.0,
        "eta_hf_total_s": 180.0,
        "wall_s": 120.0,
    }
    if kind != "plain":
        r.update(
            micro=4,
            accum=2,
            checkpointing=kind == "same",
            bf16=True,
            packing=kind == "packed",
            runtime={},
            est_step_s=1.1,
            est_peak_bytes=int(2.2 * 2**30),
            est_total_s=44.0,
            eta_dlm_total_s=104.0,
            reason="reason: ...",
        )
    r.update(extra)
    return r


def _results(dora_tax: float = 1.05) -> list[dict]:
    out = []
    for adapter, dropout in figures.VARIANTS:
        tax = dora_tax if adapter == "dora" else 1.0
        out += [
            _result("plain", adapter, dropout, 100 / tax / 1.2),
            _result("same", adapter, dropout, 99 / tax / 1.2),
            _result("dlm", adapter, dropout, 150 / tax, loss=1.99),
        ]
    return out + [_result("packed", "lora", 0.0, 180.0), _result("malloc-off", "lora", 0.0, 136.0)]


def test_summary_ratios_and_targets() -> None:
    s = figures.summarise(_results())
    row = s["rows"][0]
    assert row["variant"] == "LoRA d=0"
    assert row["same_vs_plain"] == pytest.approx(100 / 99)  # time per token, same / plain
    assert row["speedup"] == pytest.approx(1.8)
    assert {x["kind"]: x["ratio"] for x in s["dora_lora"] if x["dropout"] == 0.05} == pytest.approx(
        {"plain": 1.05, "dlm": 1.05}
    )
    assert s["met"] == {"same": True, "speedup": True, "dora_lora": True, "eta": True, "memory": True}
    gains = {a["kind"]: a["plan_gain"] for a in s["ablations"]}  # the plan's tokens/s over the ablation's
    assert gains == pytest.approx({"packed": 150 / 180, "malloc-off": 150 / 136})  # no ckpt-on run: left out
    assert s["detail"]["speedup"].startswith("tokens/s x1.80; held-out loss vs plain -0.50%")
    assert s["detail"]["memory"] == "estimate / peak RSS x1.10" and s["detail"]["eta"] == "projected / real x1.04"


def test_same_vs_plain_uses_the_mean_of_the_abba_runs_and_ablations_the_plan_mean() -> None:
    results = _results()
    results.insert(2, _result("same", "lora", 0.0, 109.0, repeat=1))  # drift: the later runs are faster
    results.insert(3, _result("plain", "lora", 0.0, 110.0, repeat=1))
    results.append(_result("dlm", "lora", 0.0, 170.0, repeat=1))
    for r in results:
        if r.get("repeat"):
            r["config"]["repeat"] = r.pop("repeat")
    s = figures.summarise(results)
    row = s["rows"][0]
    assert row["same_vs_plain"] == pytest.approx(((100 / 1.2 + 110) / 2) / ((99 / 1.2 + 109) / 2))
    assert row["same_runs"] == 2 and row["same"]["config"].get("repeat", 0) == 0  # the table shows the main run
    assert row["speedup"] == pytest.approx(1.8)  # dlm vs plain: the main runs only
    gains = {a["kind"]: a["plan_gain"] for a in s["ablations"]}
    assert gains["malloc-off"] == pytest.approx((150 + 170) / 2 / 136)


def test_run_order_is_abba_per_variant_then_ablations_then_the_plan_again(monkeypatch, tmp_path: Path) -> None:
    seen: list[tuple] = []

    def record(cfg: dict, log_dir: Path) -> dict:
        seen.append((cfg["kind"], cfg["adapter"], cfg["dropout"], cfg["steps"], cfg.get("repeat", 0)))
        return {"config": cfg} if cfg["kind"] == "prepare" else {"config": cfg, "error": "not run"}

    monkeypatch.setattr(harness, "run_one", record)
    harness.run_all(Path("doc.dlm"), tmp_path, 32, tmp_path, variants=(("dora", 0.05),))
    short = figures.REPEAT_STEPS
    assert seen == [
        ("prepare", "lora", 0.0, 32, 0),
        ("plain", "dora", 0.05, 32, 0),
        ("same", "dora", 0.05, 32, 0),
        ("same", "dora", 0.05, short, 1),
        ("plain", "dora", 0.05, short, 1),
        ("dlm", "dora", 0.05, 32, 0),
        ("packed", "lora", 0.0, 32, 0),
        ("malloc-off", "lora", 0.0, 32, 0),
        ("ckpt-on", "lora", 0.0, 32, 0),
        ("dlm", "lora", 0.0, 32, 1),
    ]


def test_targets_can_fail_and_missing_runs_are_unknown() -> None:
    results = _results(dora_tax=1.3)
    results[2]["eval_loss"] = 2.5  # dlm's held-out loss worse than plain's on LoRA d=0
    results[2]["eta_dlm_total_s"] = 150.0
    s = figures.summarise(results)
    assert s["met"]["dora_lora"] is False and s["met"]["speedup"] is False and s["met"]["eta"] is False
    partial = figures.summarise([r for r in _results() if r["config"]["kind"] != "same"])
    assert partial["met"]["same"] is None and partial["rows"][0]["same_vs_plain"] is None
    failed = figures.summarise([{"config": {"kind": "dlm", "adapter": "lora", "dropout": 0.0}, "error": "exit 1"}])
    assert failed["rows"][0]["dlm"] is None


def test_markdown_and_chart(tmp_path: Path) -> None:
    results = _results()
    s = figures.summarise(results)
    info = {
        "file": "configs/corpus-lora.dlm",
        "steps": 40,
        "command": "make bench",
        "date": "today",
        "minutes": 20.0,
        "load_before": 1.5,
        "load_after": 3.0,
        "machine": harness.machine(),
    }
    text = report.markdown(results, s, info)
    for part in (
        "## Machine",
        "## Speed",
        "## DoRA / LoRA",
        "## ETA",
        "## The planner's estimates",
        "## Targets",
        "## Method",
        "## GPU",
        "x1.80",
        "**met**",
        "other jobs shared the CPU",
        "## The plan's decisions one at a time",
        "| `packing: true` (the plan: off) | 180 | 150 | x0.833 |",
    ):
        assert part in text, part
    out = report.report(results, info, tmp_path / "perf.md", tmp_path / "perf.png")  # what --from-results does
    assert (tmp_path / "perf.md").read_text() == text == out["markdown"]
    assert (tmp_path / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target speedup: met" in report.ratio_table(s)


@pytest.mark.integration
def test_worker_same_knobs_trains_exactly_what_the_plain_script_trains(tmp_path: Path) -> None:
    """The `same` run is dlm's path with the plain script's knobs: identical tokens and held-out loss."""
    from tests.test_probe import DOC
    from tests.tinymodel import tiny_base

    doc = tmp_path / "notes.dlm"
    doc.write_text(DOC.format(base=tiny_base(tmp_path / "base")))
    cfg = {"file": str(doc), "adapter": "dora", "dropout": 0.05, "steps": 4, "home": str(tmp_path / "home")}
    ready = harness.run_one({**cfg, "kind": "prepare"}, tmp_path)
    assert Path(ready["base_folder"]) == tmp_path / "base" and "tokens_per_s" not in ready  # trains nothing
    plain = harness.run_one({**cfg, "kind": "plain"}, tmp_path)
    same = harness.run_one({**cfg, "kind": "same"}, tmp_path)
    dlm = harness.run_one({**cfg, "kind": "dlm"}, tmp_path)
    for r in (plain, same, dlm):
        assert "error" not in r, r.get("error")
        assert r["steps"] == 4 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["real_total_s"] > 0
    assert same["tokens"] == plain["tokens"]
    assert same["eval_loss"] == pytest.approx(plain["eval_loss"], abs=1e-6)
    assert same["checkpointing"] is True and same["runtime"] == {} and same["optim"] == plain["optim"]
    assert (
        dlm["runtime"]
        == {
            "dora_dropout": "branch",
            "dora_norm": "factored",
            "threads": dlm["runtime"]["threads"],
            "malloc": "keep-freed",
        }
        and dlm["checkpointing"] is False
    )
    assert not (tmp_path / "home" / "store").exists()


# --- bench/gpu.py: the GPU table from saved figures (no GPU needed) --------------------------------


def test_gpu_table_renders_the_saved_h200_figures() -> None:
    import json

    from bench import gpu

    saved = json.loads((Path(__file__).resolve().parent.parent / "bench" / "gpu-h200.json").read_text())
    text = gpu.table(saved)
    rows = [r for r in text.splitlines()[2:] if r.startswith("|")]
    assert len(rows) == sum(1 for r in saved["runs"] if "steady_s" in r) == 9
    lora_135m = next(r for r in rows if "| smollm2-135m | lora | dlm |" in r)
    # dlm / plain tokens/s from the two runs' figures, and MFU from 4 FLOPs per frozen parameter
    assert "x1.66" in lora_135m and "| 0.6% |" in lora_135m
    assert "x1.73" in next(r for r in rows if "| smollm2-1.7b | lora | dlm |" in r)
    assert "| 10.2% |" in next(r for r in rows if "| smollm2-1.7b | lora | dlm |" in r)


def test_gpu_docs_are_llama_documents_with_no_knobs(tmp_path: Path) -> None:
    from bench import gpu
    from dlm.doc.grammar import parse_doc

    docs = gpu.write_docs(tmp_path / "bases", tmp_path / "docs")
    assert set(docs) == {(s, a) for s in gpu.SIZES for a in ("lora", "qlora", "dora")}
    doc = parse_doc(docs["smollm2-1.7b", "dora"].read_text(), str(docs["smollm2-1.7b", "dora"]))
    assert doc.frontmatter["training"] == {"adapter": "dora"}
    assert doc.frontmatter["base_model"].endswith("smollm2-1.7b")


def test_gpu_dpo_docs_hold_600_triples_and_train_dpo_only(tmp_path: Path) -> None:
    from bench import gpu
    from dlm.doc.grammar import parse_doc
    from dlm.plan.corpus import examples

    docs = gpu.write_dpo_docs(tmp_path / "bases", tmp_path / "docs")
    assert set(docs) == set(gpu.SIZES)
    doc = parse_doc(docs["smollm2-135m"].read_text(), str(docs["smollm2-135m"]))
    assert doc.frontmatter["training"] == {"objective": "dpo"}
    exs = examples(doc, None)
    pref = [e for e in exs if e.kind == "preference"]
    assert len(pref) == 600 and len({e.prompt for e in pref}) == 600
    assert all(e.completion != e.rejected for e in pref)


def test_gpu_table_renders_the_saved_h200_dpo_figures() -> None:
    import json

    from bench import gpu

    saved = json.loads((Path(__file__).resolve().parent.parent / "bench" / "gpu-h200-dpo.json").read_text())
    rows = [r for r in gpu.table(saved).splitlines()[2:] if r.startswith("|")]
    assert len(rows) == 6 and all("| dpo |" in r and "| n/a |" in r for r in rows)  # no MFU: the FLOPs differ
    assert "| 0.344 (1.04) |" in next(r for r in rows if "| smollm2-135m | lora |" in r)
