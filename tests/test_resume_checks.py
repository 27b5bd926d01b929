"""`--resume` continues a run only under the shape it began with, and restores every rank's RNG.

Unit (no torch): the run's shape from a real `prepare` on hardware fixtures; a changed hardware-derived
decision, world size, `--max-steps`, base file or store format is named from what to what; a change of
run mechanics alone (CPU cores, a touched but unchanged base file) is not; a checkpoint without a
rank's RNG state is refused. Integration (tiny model): an interrupted run whose base, machine or launch
changed is refused with exit 2 and nothing written, then resumes once the change is undone; two
processes under torchrun, interrupted and resumed, end with the uninterrupted run's adapter and loss
curve, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dlm.errors import DlmError
from dlm.plan.hardware import load_fixture
from dlm.plan.prepare import prepare
from dlm.store.resume import DIGESTS, base_files, check_resume, run_shape

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hardware"
ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4F"
QA = "\n".join(f"### Q\nWhat is item {i}?\n### A\nItem {i} is number {i * 7} in the catalogue.\n" for i in range(12))
BIN = Path(sys.executable).parent


def write_doc(folder: Path, *, steps: int = 8, dlm_id: str = ID, name: str = "resume.dlm") -> Path:
    """Dropout on, so every rank draws from its RNG each step; no held-out rows (nothing but training)."""
    path = folder / name
    path.write_text(
        f"""---
dlm_id: {dlm_id}
base_model: ./tiny
system_prompt: Answer briefly.
training:
  max_steps: {steps}
  micro_batch_size: 2
  grad_accum: 1
  sequence_len: 64
  learning_rate: 1.0e-3
  lora_dropout: 0.1
  logging_steps: 1
  save_steps: 2
  eval_fraction: 0
---
# Catalogue

The catalogue lists items by number; every item has a number seven times its index.

::instruction::
{QA}
"""
    )
    return path


def fake_base(folder: Path, value: float = 0.5) -> Path:
    """A base folder the planner reads (config.json, safetensors headers) without torch."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "k_proj", "v_proj")]
    save_file({n: np.full((4, 4), value, np.float32) for n in names}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def planned(tmp_path: Path):
    """(doc, base folder, shape-of(hardware, **prepare kwargs)) on a torch-free fake base."""
    base = fake_base(tmp_path / "tiny")
    doc = write_doc(tmp_path)
    cpu = load_fixture(FIXTURES / "cpu.json")

    def shape_of(hardware=cpu, **kw):
        return run_shape(prepare(doc, hardware, **kw), base, tmp_path / "cache")

    return doc, base, shape_of


def checkpoint(tmp_path: Path, world: int = 1, missing: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "runs" / "r0001" / "checkpoints" / "checkpoint-4"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]
    for name in names:
        if name not in missing:
            (folder / name).write_bytes(b"rng")
    return folder


def refusal(record_shape, now_shape, ckpt: Path, doc: Path) -> DlmError:
    with pytest.raises(DlmError) as info:
        check_resume({"run": "r0001", "shape": record_shape}, now_shape, ckpt, str(doc), (3, 1))
    assert info.value.exit_code == 2 and "--fresh" in info.value.hint
    return info.value


# ---------------------------------------------------------------- unit: what counts as a change


def test_unchanged_run_resumes_and_run_mechanics_do_not_count(planned, tmp_path: Path) -> None:
    """Near misses: the same plan twice; another core count (CPU threads and the auto save/eval
    cadence follow it, no weight does); a base file copied back unchanged (new mtime and inode)."""
    doc, base, shape_of = planned
    began = shape_of()
    ckpt = checkpoint(tmp_path)
    check_resume({"run": "r0001", "shape": began}, shape_of(), ckpt, str(doc))
    cpu = load_fixture(FIXTURES / "cpu.json")
    more_cores = shape_of(dataclasses.replace(cpu, cores=16))
    assert more_cores["decisions"] == began["decisions"]  # cpu_threads differs, but is left out
    check_resume({"run": "r0001", "shape": began}, more_cores, ckpt, str(doc))
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data)
    check_resume({"run": "r0001", "shape": began}, shape_of(), ckpt, str(doc))


def test_a_hardware_derived_decision_is_named(planned, tmp_path: Path) -> None:
    """The document's text is the same; a CPU with native bf16 changes the plan's precision."""
    doc, _, shape_of = planned
    cpu = load_fixture(FIXTURES / "cpu.json")
    began = shape_of(cpu)
    now = shape_of(dataclasses.replace(cpu, native_bf16=True, cpu_flags=("amx_bf16",)))
    err = refusal(began, now, checkpoint(tmp_path), doc)
    assert "precision: fp32 -> bf16" in err.message and "checkpoint-4 of run r0001" in err.message
    assert "dtype" not in err.message  # the kwargs that follow from a named decision are not repeated
    assert err.path == str(doc) and err.line is None  # no line of the unchanged text is to blame


def test_device_kind_is_named(planned, tmp_path: Path) -> None:
    doc, _, shape_of = planned
    cpu = load_fixture(FIXTURES / "cpu.json")
    began, now = shape_of(cpu), shape_of(load_fixture(FIXTURES / "h100.json"))
    err = refusal(began, now, checkpoint(tmp_path), doc)
    assert "device: cpu -> cuda" in err.message and "resume on a cpu machine" in err.hint


def test_world_size_is_named(planned, tmp_path: Path) -> None:
    doc, _, shape_of = planned
    err = refusal(shape_of(), shape_of(world_size=2), checkpoint(tmp_path), doc)
    assert "world size (processes): 1 -> 2" in err.message
    assert "launch 1 process(es), as the run began" in err.hint


def test_max_steps_is_named(planned, tmp_path: Path) -> None:
    doc, _, shape_of = planned
    err = refusal(shape_of(), shape_of(max_steps=20), checkpoint(tmp_path), doc)
    assert "steps: 8 -> 20" in err.message and "--max-steps" in err.hint


def test_a_changed_base_file_is_named_at_base_model(planned, tmp_path: Path) -> None:
    doc, base, shape_of = planned
    began = shape_of()
    fake_base(base, value=0.25)  # same names and shapes, other weights: only the bytes differ
    now = shape_of()
    assert now["decisions"] == began["decisions"]
    err = refusal(began, now, checkpoint(tmp_path), doc)
    old, new = began["base"]["files"]["model.safetensors"], now["base"]["files"]["model.safetensors"]
    assert f"base file model.safetensors (sha256): {old[:12]} -> {new[:12]}" in err.message
    assert (err.line, err.col) == (3, 1) and "put the base's files back" in err.hint
    cached = json.loads((tmp_path / "cache" / DIGESTS).read_text())
    assert cached[str((base / "model.safetensors").resolve())]["sha256"] == new


def test_store_format_and_records_without_a_shape(planned, tmp_path: Path) -> None:
    doc, _, shape_of = planned
    now = shape_of()
    err = refusal({**now, "store_format": 0}, now, checkpoint(tmp_path), doc)
    assert "store format: 0 -> 1" in err.message and "resume with the dlm that began the run" in err.hint
    with pytest.raises(DlmError) as info:
        check_resume({"run": "r0001"}, now, checkpoint(tmp_path), str(doc))
    assert "recorded no run shape" in info.value.message and info.value.exit_code == 2


def test_a_missing_rank_rng_state_is_refused(planned, tmp_path: Path) -> None:
    doc, _, shape_of = planned
    two = shape_of(world_size=2)
    whole = checkpoint(tmp_path / "a", world=2)
    check_resume({"run": "r0001", "shape": two}, two, whole, str(doc))
    partial = checkpoint(tmp_path / "b", world=2, missing=("rng_state_1.pth",))
    with pytest.raises(DlmError) as info:
        check_resume({"run": "r0001", "shape": two}, two, partial, str(doc))
    assert "rng_state_1.pth" in info.value.message and "rng_state_0" not in info.value.message


def test_base_digests_hash_each_file_state_once(tmp_path: Path) -> None:
    base = fake_base(tmp_path / "tiny")
    (base / "README.md").write_text("not read by from_pretrained")
    (base / ".hidden.json").write_text("{}")
    first = base_files(base, tmp_path / "cache")
    assert sorted(first) == ["config.json", "model.safetensors"]
    assert base_files(base, None) == first  # the cache stores what hashing gives
    (base / "config.json").write_text((base / "config.json").read_text() + " ")
    assert base_files(base, tmp_path / "cache")["config.json"] != first["config.json"]


# ---------------------------------------------------------------- integration: refused, then resumed


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.integration
def test_resume_refused_until_the_change_is_undone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run; then `--resume` with a changed base file, another machine (bf16 flipped)
    and two processes: each refused with exit 2 and the field named, the store untouched; the
    command line says the same without a traceback; with the base restored, the resume finishes."""
    from dlm.train import device, runs
    from tests.tinymodel import tiny_base

    tiny_base(tmp_path / "tiny")
    doc, home = write_doc(tmp_path, steps=6), tmp_path / "home"
    hw = device.probe()

    def interrupt(step: int, *_: object) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cut = runs.train_document(doc, home, hw, on_step=interrupt)
    assert cut.summary.status == "interrupted" and cut.summary.steps == 3
    root = cut.store.root
    before = _snapshot(root)
    weights = tmp_path / "tiny" / "model.safetensors"
    original = weights.read_bytes()
    tiny_base(tmp_path / "tiny", seed=1)  # other weights, same config and tokenizer
    assert weights.read_bytes() != original

    with pytest.raises(DlmError) as info:
        runs.train_document(doc, home, hw, resume=True)
    assert info.value.exit_code == 2 and "base file model.safetensors (sha256)" in info.value.message
    assert (info.value.path, info.value.line) == (str(doc), 3)  # at `base_model: ./tiny`
    proc = subprocess.run(
        [str(BIN / "dlm"), "train", doc.name, "--resume"],
        cwd=tmp_path,
        env={**os.environ, "DLM_HOME": str(home), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "base file model.safetensors" in proc.stderr and "hint: pass --fresh" in proc.stderr
    assert "Traceback" not in proc.stderr

    weights.write_bytes(original)  # the base as it was: a new mtime, the same bytes
    flipped = dataclasses.replace(hw, native_bf16=not hw.native_bf16, cpu_flags=("amx_bf16",))
    with pytest.raises(DlmError) as info:
        runs.train_document(doc, home, flipped, resume=True)
    assert "precision: " in info.value.message
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DlmError) as info:
        runs.train_document(doc, home, hw, resume=True)
    assert "world size (processes): 1 -> 2" in info.value.message
    monkeypatch.delenv("WORLD_SIZE")
    assert _snapshot(root) == before  # nothing written, nothing lost

    done = runs.train_document(doc, home, hw, resume=True)
    assert done.summary.status == "ok" and done.summary.steps == 6 and done.version == "v0001"
    assert done.resumed_from == cut.summary.checkpoint


@pytest.mark.integration
def test_two_processes_interrupted_and_resumed_equal_an_uninterrupted_run(tmp_path: Path) -> None:
    """torchrun, 2 processes (gloo on the CPU), dropout on, 8 steps over two epochs: stopped after step
    3 and resumed, the run ends with the uninterrupted run's adapter bytes and loss at every step.
    Rank 1's RNG state must be in rank 0's checkpoint for that (rank 1 trains in a private folder)."""
    from tests.tinymodel import tiny_base

    tiny_base(tmp_path / "tiny")
    doc = write_doc(tmp_path, steps=8)
    full, cut, out = tmp_path / "full", tmp_path / "cut", tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1")
    driver = Path(__file__).resolve().parent / "resumedriver.py"
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(driver)]
        + [str(doc), str(full), str(cut), "2", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    report = json.loads(out.read_text())
    assert report["full"] == {"status": "ok", "steps": 8, "version": "v0001"}
    assert report["cut"]["status"] == "interrupted" and report["cut"]["steps"] == 3
    assert report["resumed"] == {"status": "ok", "steps": 8, "version": "v0001"}
    assert report["resumed_from"] == report["checkpoint"]["path"]

    def losses(version: Path) -> list[tuple[int, float]]:
        rows = [json.loads(line) for line in (version / "log.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    a, b = (home / "store" / ID / "versions" / "v0001" for home in (full, cut))
    assert [s for s, _ in losses(a)] == list(range(1, 9))
    assert losses(b)[:3] == losses(a)[:3]  # the steps before the interruption
    assert losses(b) == losses(a), (losses(a), losses(b))  # and after it: rank 1 drew the same masks
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(report["checkpoint"]["files"])
