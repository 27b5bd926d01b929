"""`report_to: tensorboard`: the planner refuses it without the package, and a run's log reads back.

The refusals run `dlm` in a subprocess whose import system cannot see the package
(`tests/hidden_packages.py`), exactly as a venv without it; the run is a real `dlm train` of a tiny
model, its event files read back with TensorBoard's own `EventAccumulator`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from dlm.doc.schema import new_id

REPO = Path(__file__).resolve().parent.parent
HIDE = str(REPO / "tests" / "hidden_packages.py")
DLM = str(Path(sys.executable).with_name("dlm"))
QA = "\n".join(f"### Q\nWhat is item {i}?\n### A\nItem {i} is number {i * 7}.\n" for i in range(10))


def write_doc(folder: Path, training: str, base: str = "smollm2-135m", dlm_id: str | None = None) -> Path:
    path = folder / "logged.dlm"
    path.write_text(
        f"---\ndlm_id: {dlm_id or new_id()}\nbase_model: {base}\ntraining:\n{training}---\n"
        f"# Items\n\nEvery item has a number seven times its index.\n\n::instruction::\n{QA}"
    )
    return path


def run_dlm(args: list[str], home: Path, cwd: Path, hidden: str | None = None) -> subprocess.CompletedProcess:
    """`dlm ARGS`, or with `hidden` packages missing from the import system."""
    cmd = [sys.executable, HIDE, hidden, "--", *args] if hidden else [DLM, *args]
    env = {**os.environ, "DLM_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def doctor_json(doc: Path, home: Path, hidden: str | None = None) -> tuple[int, dict]:
    proc = run_dlm(["doctor", str(doc), "--json"], home, doc.parent, hidden)
    return proc.returncode, json.loads(proc.stdout)


def test_doctor_refuses_tensorboard_logging_where_the_package_is_missing(tmp_path: Path) -> None:
    doc = write_doc(tmp_path, "  report_to: tensorboard\n")
    rc, out = doctor_json(doc, tmp_path / "home", hidden="tensorboard")
    assert out["hardware"]["missing_packages"] == ["tensorboard"]
    found = {f["code"]: f for f in out["files"][0]["plan"]["findings"]}
    assert rc == 1 and found["report-needs-tensorboard"]["level"] == "block"
    assert "pip install 'dlm[tensorboard]'" in found["report-needs-tensorboard"]["hint"]
    assert "block=report-needs-tensorboard(not-installed)" in out["files"][0]["plan"]["reason"]


def test_doctor_passes_tensorboard_logging_where_the_package_is_installed(tmp_path: Path) -> None:
    if find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed here (make setup installs it: the `tensorboard` extra)")
    doc = write_doc(tmp_path, "  report_to: tensorboard\n")
    rc, out = doctor_json(doc, tmp_path / "home")
    plan = out["files"][0]["plan"]
    assert rc == 0 and "report-needs-tensorboard" not in {f["code"] for f in plan["findings"]}
    assert out["hardware"]["missing_packages"] == []
    # the SFTConfig gets none: dlm writes the log itself, into runs/rNNNN/logs/ (kept), not checkpoints/
    assert plan["sft_kwargs"]["report_to"] == "none" and plan["runtime_kwargs"]["report_to"] == "tensorboard"
    assert any(d["key"] == "report_to" and "runs/rNNNN/logs/" in d["reason"] for d in plan["decisions"])


def test_hiding_one_package_hides_only_that_one(tmp_path: Path) -> None:
    """The refusal above is the package's absence, not a broken import system: other knobs still plan."""
    doc = write_doc(tmp_path, "  report_to: none\n")
    rc, out = doctor_json(doc, tmp_path / "home", hidden="tensorboard")
    assert rc == 0 and not [f for f in out["files"][0]["plan"]["findings"] if f["level"] == "block"]


# --- a real run --------------------------------------------------------------------------------


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


@pytest.mark.integration
def test_a_tensorboard_run_writes_logs_that_tensorboard_reads_back(workdir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    dlm_id = new_id()
    training = (
        "  report_to: tensorboard\n  max_steps: 4\n  eval_steps: 2\n  micro_batch_size: 2\n  grad_accum: 1\n"
        "  sequence_len: 64\n  learning_rate: 1.0e-3\n  logging_steps: 1\n  eval_fraction: 0.2\n  report: 2\n"
    )
    doc = write_doc(workdir, training, base="./tiny", dlm_id=dlm_id)
    home = tmp_path / "home"
    proc = run_dlm(["train", doc.name], home, workdir)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])

    store = home / "store" / dlm_id
    run = store / "runs" / "r0001"
    assert not (run / "checkpoints").exists()  # pruned after the commit; the log is not
    assert list((run / "logs").glob("events.out.tfevents.*"))
    acc = _events(run / "logs")
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/step_seconds",
        "eval/loss",
        "heldout/loss",
        "heldout/base_loss",
        "learning/answer_f1",
        "learning/base_answer_f1",
        "learning/answers_asked",
    } <= scalars, scalars

    # the same numbers as log.jsonl and the version's metrics
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = {e["step"]: e["loss"] for e in logged if "loss" in e}
    assert {s.step: s.value for s in acc.Scalars("train/loss")} == pytest.approx(losses)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(s.value > 0 for s in acc.Scalars("train/tokens_per_second"))
    assert [s.step for s in acc.Scalars("eval/loss")] == [2, 4]
    version = sorted((store / "versions").iterdir())[-1]
    metrics = json.loads((version / "metrics.json").read_text())
    assert acc.Scalars("heldout/loss")[-1].value == pytest.approx(metrics["eval_loss"])
    assert acc.Scalars("learning/answers_asked")[-1].value == metrics["learning"]["train"]["n"] == 2
    assert _text(acc, "learning/line") == metrics["learning"]["line"]

    # the run's config: the whole plan, as JSON, and its reason line
    plan = json.loads(_text(acc, "config/plan").removeprefix("```json\n").removesuffix("\n```"))
    assert plan["runtime_kwargs"]["report_to"] == "tensorboard" and plan["sft_kwargs"]["max_steps"] == 4
    assert _text(acc, "config/reason").startswith("reason: ")


@pytest.mark.integration
def test_train_refuses_tensorboard_logging_without_the_package_before_loading(workdir: Path, tmp_path: Path) -> None:
    doc = write_doc(workdir, "  report_to: tensorboard\n  max_steps: 2\n", base="./tiny")
    home = tmp_path / "home"
    proc = run_dlm(["train", doc.name], home, workdir, hidden="tensorboard")
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "report-needs-tensorboard" in proc.stderr and "nothing was trained" in proc.stderr
    assert "loading base" not in proc.stdout + proc.stderr
    assert not list(home.glob("store/*/runs/*"))
