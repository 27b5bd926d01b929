"""`dlm train / show / prompt / export` through the real command line, on a tiny model in a temp folder.

Each command runs as a user runs it (a subprocess of the installed entry point), so exit codes,
what reaches stdout/stderr and what is left on disk are what is asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.doc.schema import new_id
from dlm.store.opening import open_store

pytestmark = pytest.mark.integration
DLM = str(Path(sys.executable).with_name("dlm"))

QA = "\n".join(f"### Q\nWhat is item {i}?\n### A\nItem {i} is number {i * 7} in the catalogue.\n" for i in range(12))


def write_doc(
    folder: Path, name: str = "notes.dlm", *, dlm_id: str | None = None, steps: int = 3, extra: str = ""
) -> Path:
    text = f"""---
dlm_id: {dlm_id or new_id()}
base_model: ./tiny
system_prompt: Answer briefly.
training:
  max_steps: {steps}
  micro_batch_size: 2
  grad_accum: 1
  sequence_len: 64
  learning_rate: 1.0e-3
  logging_steps: 1
  eval_fraction: 0.2
{extra}---
# Catalogue

The catalogue lists items by number; every item has a number seven times its index.

::instruction::
{QA}
"""
    path = folder / name
    path.write_text(text)
    return path


def dlm(*args: str, home: Path, cwd: Path, check: int | None = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLM_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([DLM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One document trained once through `dlm train`; the later tests read its store."""
    home = tmp_path_factory.mktemp("home")
    doc = write_doc(workdir)
    proc = dlm("train", doc.name, home=home, cwd=workdir)
    return doc, home, proc


def test_train_prints_the_plan_before_step_one_then_progress_and_the_store(trained) -> None:
    doc, home, proc = trained
    out = proc.stdout
    assert "reason: " in out and "step 1/3" in out
    assert out.index("reason: ") < out.index("step 1/3")  # the plan comes before any training
    assert "ETA" in out and "tok/s" in out
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    assert str(home / "store" / dlm_id) in out.replace("\n", "")
    # the store of SPEC section 5
    root = home / "store" / dlm_id
    version = root / "versions" / "v0001"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "spec.json",
        "plan.json",
        "hardware.json",
        "summary.json",
        "log.jsonl",
        "files.json",
    ):
        assert (version / name).is_file(), name
    assert os.readlink(root / "adapter") == "versions/v0001"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["current"] == "v0001" and manifest["runs"][-1]["status"] == "ok"
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["runs"][-1]["versions"])
    summary = json.loads((version / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_loss"] > 0 and summary["adapter_bytes"] > 0
    assert not (root / "runs" / summary["run"] / "checkpoints").exists()  # a finished run keeps no checkpoints


def test_the_adapter_loads_with_peft_alone(trained, workdir: Path) -> None:
    doc, home, _ = trained
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    code = (
        "import sys; from peft import PeftModel; from transformers import AutoModelForCausalLM;"
        "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]);"
        "print(sorted(m.peft_config))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(workdir / "tiny"), str(home / "store" / dlm_id / "adapter")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "default" in proc.stdout


def test_show_lists_the_version_and_its_metrics(trained, workdir: Path) -> None:
    doc, home, _ = trained
    info = json.loads(dlm("show", doc.name, "--json", home=home, cwd=workdir).stdout)
    assert info["current"] == "v0001" and info["damaged"] is None and info["stale"] is False
    run = info["runs"][-1]
    assert run["status"] == "ok" and run["metrics"]["eval_loss"] > 0 and run["metrics"]["steady_step_seconds"] > 0
    table = dlm("show", doc.name, home=home, cwd=workdir).stdout
    assert "v0001 *" in table and "r0001" in table


def test_prompt_and_export(trained, workdir: Path, tmp_path: Path) -> None:
    doc, home, _ = trained
    proc = dlm("prompt", doc.name, "What is item 3?", "--max-tokens", "5", home=home, cwd=workdir)
    assert proc.stderr == ""  # no library chatter
    target = tmp_path / "merged"
    dlm("export", doc.name, "-o", str(target), home=home, cwd=workdir)
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert (target / "tokenizer.json").is_file()
    again = dlm("export", doc.name, "-o", str(target), home=home, cwd=workdir, check=2)  # never overwrites
    assert "not empty" in again.stderr


def test_a_second_trainer_of_the_same_document_is_refused(workdir: Path, tmp_path: Path) -> None:
    doc = write_doc(workdir, "locked.dlm")
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    store = open_store(tmp_path, dlm_id, doc, "./tiny")
    with store.lock():  # as if another `dlm train` held it
        proc = dlm("train", doc.name, home=tmp_path, cwd=workdir, check=1)
    assert "another dlm train is running on this document" in proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr


def test_a_copied_document_with_the_same_id_is_refused(trained, workdir: Path) -> None:
    doc, home, _ = trained
    copy = workdir / "copy.dlm"
    copy.write_text(doc.read_text())
    proc = dlm("train", copy.name, home=home, cwd=workdir, check=2)
    assert "already uses dlm_id" in proc.stderr and "dlm twin" in proc.stderr
    copy.unlink()


def test_a_damaged_adapter_is_never_loaded(workdir: Path, tmp_path: Path) -> None:
    doc = write_doc(workdir, "damaged.dlm", steps=1)
    dlm("train", doc.name, home=tmp_path, cwd=workdir)
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    weights = tmp_path / "store" / dlm_id / "versions" / "v0001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    weights.write_bytes(bytes(data))
    show = dlm("show", doc.name, home=tmp_path, cwd=workdir, check=1)
    assert "sha256" in show.stderr or "damaged" in show.stderr
    proc = dlm("prompt", doc.name, "hi", home=tmp_path, cwd=workdir, check=1)
    assert "hint:" in proc.stderr


def test_a_blocked_plan_trains_nothing(workdir: Path, tmp_path: Path) -> None:
    doc = write_doc(workdir, "blocked.dlm", extra="  target_modules: [q_proj, not_a_module]\n")
    proc = dlm("train", doc.name, home=tmp_path, cwd=workdir, check=1)
    assert "blocked" in proc.stderr and "target-module-missing" in proc.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.safetensors"))


def test_interrupt_then_resume(workdir: Path, tmp_path: Path) -> None:
    """Ctrl-C saves a checkpoint and exits 130; a plain re-run asks to choose; --resume finishes the run."""
    doc = write_doc(workdir, "interrupted.dlm", steps=60, extra="  save_steps: 1\n")
    env = {**os.environ, "DLM_HOME": str(tmp_path), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [DLM, "train", doc.name], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 4:
            proc.send_signal(signal.SIGINT)
            break
    rest, errs = proc.communicate(timeout=120)
    assert proc.returncode == 130, (rest, errs)
    assert "--resume" in rest and "Traceback" not in errs
    dlm_id = doc.read_text().split("dlm_id: ")[1].split()[0]
    assert not (tmp_path / "store" / dlm_id / "adapter").exists()  # nothing half-made became current

    again = dlm("train", doc.name, home=tmp_path, cwd=workdir, check=2)
    assert "--resume" in again.stderr and "--fresh" in again.stderr
    done = dlm("train", doc.name, "--resume", home=tmp_path, cwd=workdir)
    assert "version v0001" in done.stdout
    info = json.loads(dlm("show", doc.name, "--json", home=tmp_path, cwd=workdir).stdout)
    assert [r["status"] for r in info["runs"]] == ["interrupted", "ok"]
    assert info["runs"][-1]["metrics"]["steps"] == 60
    log = (tmp_path / "store" / dlm_id / "versions" / "v0001" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log if "loss" in json.loads(x)]
    assert steps == list(range(1, 61))  # the resumed log continues the interrupted one, no step twice
