"""`dlm prompt` and `dlm chat` through the real command line, on a tiny model trained in a temp folder.

One document is trained once (`dlm train`, a high learning rate so the adapter visibly moves the
tiny model); each test then runs the commands as a user does, as subprocesses, and asserts what
reaches stdout/stderr and the exit code. The answers of a random tiny model are gibberish, so the
tests compare answers with each other (base vs adapter, chat vs prompt), never with the document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.doc.schema import new_id

pytestmark = pytest.mark.integration
DLM = str(Path(sys.executable).with_name("dlm"))
QUESTIONS = ["What is item 1?", "What is item 2?", "What is item 3?"]
QA = "\n".join(f"### Q\nWhat is item {i}?\n### A\nItem {i} is number {i * 7} in the catalogue.\n" for i in range(12))

# Runs the real `dlm` entry point with `load_for_answers` counted, and reports at exit how many
# loads there were and whether the training-only libraries were imported.
DRIVER = """
import atexit, sys
from dlm.use import infer
loads = []
real = infer.load_for_answers
def counted(*a, **k):
    loads.append(1)
    return real(*a, **k)
infer.load_for_answers = counted
heavy = ("trl", "datasets", "bitsandbytes")
atexit.register(lambda: sys.stderr.write(f"\\nloads={len(loads)} " + " ".join(f"{m}={m in sys.modules}" for m in heavy) + "\\n"))
from dlm.cli.app import main
sys.argv = ["dlm", *sys.argv[1:]]
main()
"""


def run(
    *args: str, home: Path, cwd: Path, stdin: str | None = None, check: int | None = 0, counted: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLM_HOME": str(home), "COLUMNS": "200"}
    cmd = [sys.executable, "-c", DRIVER, *args] if counted else [DLM, *args]
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A catalogue document trained once with `dlm train` (8 steps at 1e-2 on every linear layer)."""
    home = tmp_path_factory.mktemp("home")
    doc = workdir / "catalogue.dlm"
    doc.write_text(
        f"""---
dlm_id: {new_id()}
base_model: ./tiny
system_prompt: Answer briefly.
training:
  max_steps: 8
  micro_batch_size: 4
  grad_accum: 1
  sequence_len: 64
  learning_rate: 1.0e-2
  target_modules: all-linear
  eval_fraction: 0.2
  report: 0
---
# Catalogue

::instruction::
{QA}
"""
    )
    run("train", doc.name, home=home, cwd=workdir)
    return doc, home


def as_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout)


def test_one_load_answers_every_question_of_a_file_and_imports_no_training_library(trained, tmp_path: Path) -> None:
    doc, home = trained
    questions = tmp_path / "questions.txt"
    questions.write_text(f"{QUESTIONS[0]}\n\n   \n{QUESTIONS[1]}\n{QUESTIONS[2]}\n")
    proc = run(
        "prompt",
        str(doc),
        "--file",
        str(questions),
        "--json",
        "--max-tokens",
        "8",
        home=home,
        cwd=doc.parent,
        counted=True,
    )
    data = as_json(proc)
    assert [a["question"] for a in data["answers"]] == QUESTIONS  # blank lines skipped, order kept
    assert "loads=1 trl=False datasets=False bitsandbytes=False" in proc.stderr


def test_json_shape_for_each_side(trained) -> None:
    doc, home = trained
    args = ("prompt", str(doc), QUESTIONS[0], "--json", "--max-tokens", "6")
    adapter = as_json(run(*args, home=home, cwd=doc.parent))
    base = as_json(run(*args, "--base", home=home, cwd=doc.parent))
    both = as_json(run(*args, "--side-by-side", home=home, cwd=doc.parent))
    for data in (adapter, base, both):
        assert set(data) == {"dlm_prompt", "version", "stale", "findings", "answers"}
        assert data["dlm_prompt"] == 1 and data["version"] == "v0001" and data["stale"] is False
        assert data["findings"] == []  # a LoRA adapter: nothing to say about answering
    assert set(adapter["answers"][0]) == {"question", "adapter"}
    assert set(base["answers"][0]) == {"question", "base"}
    assert set(both["answers"][0]) == {"question", "base", "adapter"}
    assert all(isinstance(v, str) for v in both["answers"][0].values())
    # `--base` loads the base alone; side by side switches the adapter off on one PEFT model: the same answer.
    assert base["answers"][0]["base"] == both["answers"][0]["base"]


def test_the_trained_adapter_answers_differently_from_the_base(trained) -> None:
    doc, home = trained
    both = as_json(
        run("prompt", str(doc), "-", "--side-by-side", "--json", home=home, cwd=doc.parent, stdin="\n".join(QUESTIONS))
    )
    assert len(both["answers"]) == 3
    assert any(a["base"] != a["adapter"] for a in both["answers"]), both


def test_text_output_single_and_side_by_side(trained) -> None:
    doc, home = trained
    one = run("prompt", str(doc), QUESTIONS[0], "--max-tokens", "6", home=home, cwd=doc.parent)
    data = as_json(run("prompt", str(doc), QUESTIONS[0], "--max-tokens", "6", "--json", home=home, cwd=doc.parent))
    assert one.stdout == data["answers"][0]["adapter"] + "\n"  # a single answer alone, verbatim
    both = run(
        "prompt",
        str(doc),
        "--side-by-side",
        "--max-tokens",
        "6",
        home=home,
        cwd=doc.parent,
        stdin="\n".join(QUESTIONS[:2]),
    )
    lines = both.stdout.splitlines()
    assert lines[0] == f"> {QUESTIONS[0]}" and lines[1].startswith("base: ") and lines[2].startswith("adapter: ")


def test_questions_from_stdin_without_text(trained) -> None:
    doc, home = trained
    data = as_json(
        run(
            "prompt",
            str(doc),
            "--json",
            "--max-tokens",
            "4",
            home=home,
            cwd=doc.parent,
            stdin="\n".join(QUESTIONS) + "\n\n",
        )
    )
    assert [a["question"] for a in data["answers"]] == QUESTIONS


def test_chat_over_piped_stdin_keeps_one_session(trained) -> None:
    doc, home = trained
    want = as_json(
        run(
            "prompt", str(doc), QUESTIONS[0], "--side-by-side", "--json", "--max-tokens", "8", home=home, cwd=doc.parent
        )
    )
    a, b = want["answers"][0]["adapter"], want["answers"][0]["base"]
    typed = [
        QUESTIONS[0],  # adapter, fresh conversation: as `dlm prompt` answers it
        "/base",
        "/reset",
        QUESTIONS[0],  # base, fresh conversation
        "/frobnicate",  # unknown: a message, and the session goes on
        "/adapter",
        QUESTIONS[1],  # a second turn, with history
        "/reset",
        "/system Answer briefly.",
        QUESTIONS[0],  # history forgotten: the first answer again
        "/quit",
        QUESTIONS[2],  # never asked
    ]
    proc = run(
        "chat", str(doc), "--max-tokens", "8", home=home, cwd=doc.parent, stdin="\n".join(typed) + "\n", counted=True
    )
    assert proc.stdout.startswith(f"{a}\n{b}\n") and proc.stdout.endswith(f"\n{a}\n"), (proc.stdout, a, b)
    assert len(proc.stdout.split("\n")) >= 5
    assert "adapter off" in proc.stderr and "adapter on" in proc.stderr and "conversation cleared" in proc.stderr
    assert "unknown command /frobnicate" in proc.stderr and "/base" in proc.stderr
    assert "system prompt: Answer briefly." in proc.stderr
    assert "loads=1 trl=False datasets=False bitsandbytes=False" in proc.stderr


def test_chat_ends_at_eof(trained) -> None:
    doc, home = trained
    proc = run("chat", str(doc), "--max-tokens", "4", home=home, cwd=doc.parent, stdin=QUESTIONS[0] + "\n")
    assert proc.stdout.strip()  # one answer, then EOF ends the session with exit 0


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("--file", "{empty}"), None, "no questions in the file"),
        (("--file", "{missing}"), None, "cannot read the questions: No such file"),
        (("--file", "{folder}"), None, "cannot read the questions"),
        (("-",), "\n  \n", "no questions on stdin"),
        ((), "", "no questions on stdin"),
        (("x", "--file", "{empty}"), None, "give the questions one way"),
        (("x", "--base", "--side-by-side"), None, "--side-by-side already shows the base's answers"),
        (("   ",), None, "the question is empty"),
    ],
)
def test_bad_input_is_one_error_with_a_hint(trained, tmp_path: Path, args, stdin, message) -> None:
    doc, home = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    paths = {"empty": str(empty), "missing": str(tmp_path / "nope.txt"), "folder": str(tmp_path)}
    proc = run("prompt", str(doc), *(a.format(**paths) for a in args), home=home, cwd=doc.parent, stdin=stdin, check=2)
    assert message in proc.stderr and "\nhint: " in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_a_stale_adapter_is_noted_by_prompt_and_chat(trained) -> None:
    doc, home = trained
    text = doc.read_text()
    try:
        doc.write_text(text + "\nOne more line.\n")
        proc = run("prompt", str(doc), QUESTIONS[0], "--max-tokens", "2", home=home, cwd=doc.parent)
        assert "changed since v0001 was trained" in proc.stderr
        proc = run("chat", str(doc), "--max-tokens", "2", home=home, cwd=doc.parent, stdin="/quit\n")
        assert "changed since v0001 was trained" in proc.stderr and proc.stdout == ""
    finally:
        doc.write_text(text)
