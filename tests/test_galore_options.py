"""GaLore's options: a rank that projects by default, and a refusal, not an ImportError, without galore-torch.

Unit tier for the planner (the decision, its reason, the kwargs); the refusal runs `dlm doctor` with
galore-torch hidden from the import system (`tests/hidden_packages.py`); the integration test trains
the tiny model with the default rank and reads GaLore's optimizer state to see it projected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from dlm.doc.schema import new_id, parse_spec
from dlm.errors import DlmError
from dlm.plan import bases
from dlm.plan.corpus import CorpusStats
from dlm.plan.hardware import HardwareFacts, load_fixture
from dlm.plan.planner import Plan, make_plan

REPO = Path(__file__).resolve().parent.parent
CPU = REPO / "tests" / "fixtures" / "hardware" / "cpu.json"
STATS = CorpusStats(n_train=40, n_heldout=4, train_tokens=2400, max_tokens=120, n_prose=10, n_instruction=30)


def plan(hw: HardwareFacts | None = None, **training) -> Plan:
    spec = parse_spec({"dlm_id": new_id(), "training": training})
    return make_plan(spec, hw or load_fixture(CPU), bases.resolve("smollm2-135m"), STATS)


def finding(p: Plan, code: str):
    return next((f for f in p.findings if f.code == code), None)


# --- the default rank ----------------------------------------------------------------------------


@pytest.mark.parametrize(("lora_r", "rank"), [(8, 4), (16, 8), (3, 1), (64, 32)])
def test_auto_rank_is_half_the_adapter_rank(lora_r: int, rank: int) -> None:
    p = plan(optimizer="galore_adamw", lora_r=lora_r)
    assert p.decision("galore_rank") == rank
    why = next(d.reason for d in p.decisions if d.key == "galore_rank")
    assert why.startswith(f"auto: half of lora_r {lora_r}") and "save nothing" in why
    assert p.sft_kwargs["optim_args"].startswith(f"rank={rank},")
    assert finding(p, "galore-rank-no-projection") is None
    assert finding(p, "galore-with-adapter").evidence == {"galore_rank": rank, "lora_r": lora_r}


def test_a_written_rank_is_honoured_and_judged() -> None:
    below = plan(optimizer="galore_adamw", galore_rank=2)
    assert below.decision("galore_rank") == 2 and below.sft_kwargs["optim_args"].startswith("rank=2,")
    assert finding(below, "galore-rank-no-projection") is None
    old_default = plan(optimizer="galore_adamw", galore_rank=128)
    assert old_default.sft_kwargs["optim_args"].startswith("rank=128,")
    assert "nothing is projected" in next(d.reason for d in old_default.decisions if d.key == "galore_rank")
    warned = finding(old_default, "galore-rank-no-projection")
    assert warned.level == "warn" and warned.tag == "128>=8" and "auto takes half of lora_r: 4" in warned.hint
    assert "warn=galore-small-base(135M<1B),galore-rank-no-projection(128>=8)" in old_default.reason


def test_rank_one_adapters_have_nothing_to_project() -> None:
    p = plan(optimizer="galore_adamw", lora_r=1)
    assert p.decision("galore_rank") == 1
    assert "nothing to project" in finding(p, "galore-rank-no-projection").hint


def test_no_galore_no_rank_decision() -> None:
    p = plan(optimizer="adamw_torch")
    assert "galore_rank" not in {d.key for d in p.decisions} and "optim_args" not in p.sft_kwargs


@pytest.mark.parametrize("value", [0, -4, "half", 2.5])
def test_schema_takes_auto_or_a_positive_integer(value) -> None:
    assert parse_spec({"dlm_id": new_id(), "training": {}}).training.galore_rank == "auto"
    with pytest.raises(DlmError, match="galore_rank"):
        parse_spec({"dlm_id": new_id(), "training": {"galore_rank": value}})


# --- galore-torch missing ------------------------------------------------------------------------


def test_missing_galore_torch_blocks_every_galore_optimizer() -> None:
    import dataclasses

    bare = dataclasses.replace(load_fixture(CPU), missing_packages=("galore-torch",))
    for optimizer in ("galore_adamw", "galore_adamw_8bit", "galore_adamw_layerwise"):
        f = finding(plan(bare, optimizer=optimizer, grad_accum=1), "galore-needs-galore-torch")
        assert f.level == "block" and "pip install 'dlm[galore]'" in f.hint and "galore-torch==1.0" in f.hint
    assert finding(plan(bare, optimizer="adamw_torch"), "galore-needs-galore-torch") is None


def test_doctor_refuses_galore_where_galore_torch_is_missing(tmp_path: Path) -> None:
    doc = tmp_path / "galore.dlm"
    doc.write_text(
        f"---\ndlm_id: {new_id()}\ntraining:\n  optimizer: galore_adamw\n---\n"
        "::instruction::\n### Q\nWhat is GaLore?\n### A\nGradient low-rank projection.\n"
    )
    env = {**os.environ, "DLM_HOME": str(tmp_path / "home")}
    hidden = [sys.executable, str(REPO / "tests" / "hidden_packages.py"), "galore-torch", "--"]
    results = {}
    for name, cmd in (("hidden", hidden), ("installed", [sys.executable, "-m", "dlm"])):
        proc = subprocess.run(
            [*cmd, "doctor", str(doc), "--json"], env=env, capture_output=True, text=True, timeout=300
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        out = json.loads(proc.stdout)
        results[name] = (proc.returncode, {f["code"] for f in out["files"][0]["plan"]["findings"]})
        if name == "hidden":
            assert out["hardware"]["missing_packages"] == ["galore-torch"]
    assert results["hidden"][0] == 1 and "galore-needs-galore-torch" in results["hidden"][1]
    if find_spec("galore_torch") is not None:  # installed here: the near miss
        assert "galore-needs-galore-torch" not in results["installed"][1]


# --- the default rank on a real run ----------------------------------------------------------------


@pytest.mark.integration
def test_the_default_rank_projects_the_adapter_gradients(workdir: Path, tmp_path: Path) -> None:
    """GaLore keeps its Adam moments in the projected space: with the default rank they are half the
    size of each lora_A / lora_B; with the old default (128) they were the full matrices."""
    pytest.importorskip("galore_torch")
    from dlm.plan import corpus, hardware
    from dlm.plan.corpus import Example
    from dlm.train import run as train

    examples = [
        Example(f"q{i}", "instruction", "t.dlm", i, prompt=f"What is item {i}?", completion=f"Number {i * 7}.")
        for i in range(8)
    ]
    knobs = dict(precision="fp32", gradient_checkpointing=False, max_steps=2, micro_batch_size=2, grad_accum=1)
    spec = parse_spec(
        {"dlm_id": new_id(), "base_model": str(workdir / "tiny"), "training": {"optimizer": "galore_adamw", **knobs}}
    )
    p = make_plan(spec, hardware.probe_light(), bases.resolve(str(workdir / "tiny")), corpus.stats(tuple(examples), ()))
    assert p.decision("galore_rank") == 4 and p.lora_kwargs["r"] == 8

    seen: list[tuple[str, tuple, tuple]] = []

    class Moments:
        def __getattr__(self, name):
            if name.startswith("on_"):
                return lambda *a, **k: None
            raise AttributeError(name)

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kw):
            names = {id(weight): n for n, weight in model.named_parameters()}
            for group in optimizer.param_groups:
                for param in group["params"]:
                    moment = optimizer.state.get(param, {}).get("exp_avg")
                    if "rank" in group and moment is not None:
                        seen.append((names[id(param)], tuple(param.shape), tuple(moment.shape)))

    summary = train.run(p, examples, [], workdir / "tiny", tmp_path, callbacks=[Moments()], eval_base=False)
    assert summary.status == "ok", summary.message
    assert seen and all(".lora_A." in n or ".lora_B." in n for n, _, _ in seen)
    for name, shape, moment in seen:
        projected = (4, shape[1]) if ".lora_A." in name else (shape[0], 4)  # lora_A: 8 x in; lora_B: out x 8
        assert moment == projected, (name, shape, moment)
