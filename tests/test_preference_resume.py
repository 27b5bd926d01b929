"""Preference training, continued (docs/preference.md): a two-phase run (SFT, then DPO) interrupted in
either phase resumes exactly through `dlm train --resume` (`runs.train_document`), and DoRA and QLoRA
adapters train DPO on the tiny model into adapters that PEFT loads without dlm.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dlm.errors import DlmError
from dlm.train.loop import trim_log
from tests.test_preference import PREF_BODY, SFT_BODY, TINY, write

# Five steps a phase, a checkpoint every two: reference sft (the two-phase default), so a resume that
# took the DPO-trained weights for the frozen reference would log other losses.
TWO_PHASE = (
    "  objective: dpo\n"
    + TINY.format(steps=5)
    + "  save_steps: 2\n  report: 0\n  preference:\n    learning_rate: 5.0e-3\n"
)


class Watch:
    """on_step / on_event for `train_document`: records (phase, step) of every step and the events,
    and sends this process a SIGINT (a Ctrl-C) once `stop` = (phase, step) is reported."""

    def __init__(self, stop: tuple[str, int] | None = None):
        self.stop, self.phase = stop, "sft"
        self.steps: list[tuple[str, int]] = []
        self.events: list[tuple[str, dict]] = []

    def on_event(self, kind: str, data: dict) -> None:
        self.events.append((kind, data))
        if kind == "phase":
            self.phase = data["phase"]

    def on_step(self, step: int, *_: Any) -> None:
        self.steps.append((self.phase, step))
        if (self.phase, step) == self.stop:
            os.kill(os.getpid(), signal.SIGINT)

    def kinds(self, kind: str) -> list[dict]:
        return [d for k, d in self.events if k == kind]


def _train(doc: Path, home: Path, watch: Watch | None = None, **kw: Any) -> Any:
    from dlm.train import device, runs

    watch = watch or Watch()
    return runs.train_document(doc, home, device.probe(), on_step=watch.on_step, on_event=watch.on_event, **kw)


def _version(out: Any) -> Path:
    return Path(out.store.root) / "versions" / out.version


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _losses(log: list[dict], phase: str) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log if "loss" in e and e.get("phase") == phase]


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _same_adapter(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    x, y = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    assert x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


@pytest.fixture(scope="module")
def two_phase(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """The two-phase document and its uninterrupted run (the run each resume must equal)."""
    doc = write(workdir, "two-phase-resume.dlm", TWO_PHASE, SFT_BODY + PREF_BODY)
    full = _train(doc, tmp_path_factory.mktemp("full") / "home")
    assert full.summary.status == "ok"
    assert [(p["phase"], p["steps"]) for p in full.summary.phases] == [("sft", 5), ("dpo", 5)]
    return doc, full


@pytest.mark.integration
def test_two_phase_interrupted_twice_in_dpo_resumes_exactly_without_training_sft_again(
    two_phase: tuple[Path, Any], tmp_path: Path
) -> None:
    """Ctrl-C in the DPO phase, `--resume`, Ctrl-C again, `--resume`: the SFT phase never trains again
    (its final checkpoint's adapter is loaded, and carried into each new run), the DPO phase continues
    from its newest checkpoint in `checkpoints-dpo/`, and the version equals the uninterrupted one:
    adapter tensors, every logged loss, the preference figures, both phases' steps."""
    doc, full = two_phase
    home = tmp_path / "home"
    first = _train(doc, home, Watch(stop=("dpo", 1)))
    cut1 = Path(first.summary.checkpoint)
    assert first.summary.status == "interrupted" and cut1.parent.name == "checkpoints-dpo"
    sft_final = cut1.parent.parent / "checkpoints" / "checkpoint-5"
    assert (sft_final / "trainer_state.json").is_file()  # the SFT phase saves at its last step
    _same_adapter(cut1 / "ref", sft_final)  # the frozen reference in the DPO checkpoint: the SFT adapter
    with pytest.raises(DlmError) as plain:  # training again without a flag says where it stopped
        _train(doc, home)
    assert f"stopped at {cut1.name} of its DPO phase without finishing" in str(plain.value)

    # Without the SFT phase's final checkpoint the DPO phase has nothing to continue: refused, exit 2,
    # before anything is written.
    aside = tmp_path / "aside"
    shutil.move(sft_final.parent, aside)
    runs_before = json.loads((Path(first.store.root) / "manifest.json").read_text())["runs"]
    with pytest.raises(DlmError) as refused:
        _train(doc, home, resume=True)
    assert refused.value.exit_code == 2 and "SFT phase" in str(refused.value) and "--fresh" in refused.value.hint
    assert json.loads((Path(first.store.root) / "manifest.json").read_text())["runs"] == runs_before
    shutil.move(aside, sft_final.parent)

    w2 = Watch(stop=("dpo", _step(cut1) + 1))
    second = _train(doc, home, w2, resume=True)
    assert second.resumed_from == str(cut1) and second.summary.status == "interrupted"
    cut2 = Path(second.summary.checkpoint)
    assert cut2.parent.name == "checkpoints-dpo" and _step(cut2) > _step(cut1)
    assert (cut2.parent.parent / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors").is_file()  # carried
    assert all(phase == "dpo" and step > _step(cut1) for phase, step in w2.steps)  # SFT did not train
    assert len(w2.kinds("train_begin")) == 1 and w2.kinds("sft_done")[0]["step"] == 5

    w3 = Watch()
    third = _train(doc, home, w3, resume=True)
    s = third.summary
    assert third.resumed_from == str(cut2) and s.status == "ok" and third.version == "v0001"
    assert w3.steps == [("dpo", n) for n in range(_step(cut2) + 1, 6)] and len(w3.kinds("train_begin")) == 1
    _same_adapter(_version(full), _version(third))
    assert [(p["phase"], p["steps"], p["max_steps"]) for p in s.phases] == [("sft", 5, 5), ("dpo", 5, 5)]
    assert s.steps == full.summary.steps == 10 and s.train_loss == full.summary.train_loss
    assert s.preference == full.summary.preference and s.preference["reference"] == "sft"
    log, full_log = _log(_version(third)), _log(_version(full))
    for phase in ("sft", "dpo"):  # each step logged once, with the uninterrupted run's loss
        assert _losses(log, phase) == _losses(full_log, phase)
        assert [n for n, _ in _losses(log, phase)] == [1, 2, 3, 4, 5]
    metrics = json.loads((_version(third) / "metrics.json").read_text())
    assert [(p["phase"], p["steps"]) for p in metrics["phases"]] == [("sft", 5), ("dpo", 5)]
    assert not list((Path(third.store.root) / "runs").glob("*/checkpoints*"))  # pruned after the commit


@pytest.mark.slow  # a variant of the test above; `make test-slow` (keeps `make test` short)
def test_two_phase_interrupted_in_sft_resumes_sft_then_trains_dpo_from_its_start(
    two_phase: tuple[Path, Any], tmp_path: Path
) -> None:
    doc, full = two_phase
    home = tmp_path / "home"
    first = _train(doc, home, Watch(stop=("sft", 2)))
    cut = Path(first.summary.checkpoint)
    assert first.summary.status == "interrupted" and cut.parent.name == "checkpoints" and _step(cut) < 5
    assert not (cut.parent.parent / "checkpoints-dpo").exists()
    w = Watch()
    resumed = _train(doc, home, w, resume=True)
    assert resumed.resumed_from == str(cut) and resumed.summary.status == "ok"
    assert w.steps == [("sft", n) for n in range(_step(cut) + 1, 6)] + [("dpo", n) for n in range(1, 6)]
    _same_adapter(_version(full), _version(resumed))
    assert resumed.summary.preference == full.summary.preference
    log, full_log = _log(_version(resumed)), _log(_version(full))
    for phase in ("sft", "dpo"):
        assert _losses(log, phase) == _losses(full_log, phase)


@pytest.mark.slow  # a variant of the test above; `make test-slow` (keeps `make test` short)
def test_two_phase_with_reference_base_resumes_in_dpo_from_its_own_folder(workdir: Path, tmp_path: Path) -> None:
    """`train.run(resume_from=True)` in the interrupted run's own folder (nothing to carry), reference:
    base (the `ref` copy is deleted, the DPO checkpoint holds the adapter alone): no SFT step trains
    again and the adapter equals the uninterrupted run's."""
    from dlm.plan.prepare import prepare
    from dlm.train import device
    from dlm.train import run as train

    training = (
        "  objective: dpo\n"
        + TINY.format(steps=3)
        + "  save_steps: 1\n  preference:\n    reference: base\n    learning_rate: 5.0e-3\n"
    )
    p = prepare(write(workdir, "two-phase-base.dlm", training, SFT_BODY + PREF_BODY), device.probe())

    def run(folder: str, watch: Watch, **kw: Any) -> Any:
        out = tmp_path / folder
        return train.run(p.plan, p.train, p.heldout, workdir / "tiny", out, on_step=watch.on_step,
                         on_event=watch.on_event, eval_base=False, **kw)  # fmt: skip

    full = run("full", Watch())
    cut = run("cut", Watch(stop=("dpo", 1)))
    assert cut.status == "interrupted" and Path(cut.checkpoint).parent.name == "checkpoints-dpo"
    assert not (Path(cut.checkpoint) / "ref").exists()
    w = Watch()
    resumed = run("cut", w, resume_from=True)
    assert (
        resumed.status == "ok" and w.steps and all(ph == "dpo" and n > _step(Path(cut.checkpoint)) for ph, n in w.steps)
    )
    _same_adapter(Path(full.adapter_dir), Path(resumed.adapter_dir))
    assert resumed.preference == full.preference and resumed.preference["reference"] == "base"
    assert [(q["phase"], q["steps"]) for q in resumed.phases] == [("sft", 3), ("dpo", 3)]


def test_trim_log_keeps_the_other_phase_of_a_two_phase_run(tmp_path: Path) -> None:
    """Each phase counts steps from 1: resuming in the DPO phase at step 2 keeps every SFT line and DPO
    lines 1-2; resuming in the SFT phase at step 2 drops every DPO line; a one-phase run cuts by step."""
    lines = [{"step": n, "phase": p} for p in ("sft", "dpo") for n in (1, 2, 3)]
    log = tmp_path / "log.jsonl"

    def kept(upto: int, phase: str | None) -> list[tuple[str, int]]:
        log.write_text("".join(json.dumps(e) + "\n" for e in lines))
        trim_log(log, upto, phase)
        return [(e["phase"], e["step"]) for e in _log(tmp_path)]

    assert kept(2, "dpo") == [("sft", 1), ("sft", 2), ("sft", 3), ("dpo", 1), ("dpo", 2)]
    assert kept(2, "sft") == [("sft", 1), ("sft", 2)]
    assert kept(2, None) == [("sft", 1), ("sft", 2), ("dpo", 1), ("dpo", 2)]


# --- DoRA and QLoRA under DPO ------------------------------------------------------------------------

LOAD = (
    "import json, sys; from peft import PeftModel; from transformers import AutoModelForCausalLM;"
    "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]);"
    "print(json.dumps({'adapters': sorted(m.peft_config), 'use_dora': m.peft_config['default'].use_dora,"
    "'lora_params': sum(p.numel() for n, p in m.named_parameters() if 'lora_' in n)}))"
)


@pytest.mark.integration
@pytest.mark.parametrize("adapter", ["dora", "qlora"])
def test_dora_and_qlora_train_both_phases_into_an_adapter_peft_loads(
    adapter: str, workdir: Path, tmp_path: Path
) -> None:
    """A two-phase run (reference sft: TRL copies the SFT adapter, DoRA magnitudes or 4-bit base
    included, into a frozen second adapter) with `adapter: dora` / `qlora`: finite losses, a version
    whose adapter PEFT loads on the plain base with no dlm code, the preference figures in metrics.json."""
    training = f"  objective: dpo\n  adapter: {adapter}\n" + TINY.format(steps=2)
    doc = write(workdir, f"dpo-{adapter}.dlm", training, SFT_BODY + PREF_BODY)
    out = _train(doc, tmp_path / "home")
    s = out.summary
    assert s.status == "ok" and [(p["phase"], p["steps"]) for p in s.phases] == [("sft", 2), ("dpo", 2)]
    if adapter == "qlora":
        assert out.prepared.plan.model_kwargs["quantization"]["load_in_4bit"] is True
    version = _version(out)
    losses = [e["loss"] for e in _log(version) if "loss" in e]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)  # finite (a NaN is logged as null)
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["pref_n"] == 2 and metrics["preference"]["reference"] == "sft"
    for key in ("pref_accuracy", "base_pref_accuracy", "reward_margin", "train_reward_margin"):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key], key  # present and not NaN
    config = json.loads((version / "adapter_config.json").read_text())
    assert config["use_dora"] is (adapter == "dora")
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD, str(workdir / "tiny"), str(version)], capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    found = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert found["adapters"] == ["default"] and found["use_dora"] is (adapter == "dora") and found["lora_params"] > 0


def test_a_dpo_run_resumes_on_more_cores(workdir: Path, tmp_path: Path) -> None:
    """Near miss: the plan's DPO step estimate (`dpo_step_seconds`) follows the core count and changes no
    weight, so it is a run mechanic: a DPO run begun on 2 cores resumes on 16, also when its shape was
    recorded before the estimate counted as one. A changed DPO step count is still refused."""
    import dataclasses

    from dlm.plan.hardware import load_fixture
    from dlm.plan.prepare import prepare
    from dlm.store.resume import check_resume, run_shape

    doc = write(workdir, "dpo-cores.dlm", TWO_PHASE, SFT_BODY + PREF_BODY)
    cpu = load_fixture(Path(__file__).parent / "fixtures" / "hardware" / "cpu.json")

    def shape(cores: int, **kw: Any) -> dict[str, Any]:
        return run_shape(prepare(doc, dataclasses.replace(cpu, cores=cores), **kw), workdir / "tiny", tmp_path)

    began, now = shape(2), shape(16)
    ckpt = tmp_path / "runs" / "r0001" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "rng_state.pth").write_bytes(b"rng")
    old = json.loads(json.dumps(began))
    old["decisions"]["dpo_step_seconds"] = 16.4  # as a run recorded before this release holds it
    for recorded in (began, old):
        check_resume({"run": "r0001", "shape": recorded}, now, ckpt, str(doc))
    with pytest.raises(DlmError) as refused:
        check_resume({"run": "r0001", "shape": began}, shape(16, max_steps=3), ckpt, str(doc))
    assert "steps" in str(refused.value)
