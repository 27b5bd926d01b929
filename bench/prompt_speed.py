"""Prompt and chat latency on a trained document: the table of docs/performance.md, "Prompt and chat
latency".

    DLM_HOME=.dlm-home .venv/bin/python bench/prompt_speed.py [--doc configs/tutor.dlm] [--repeat 3]
        [--before SRC]

Needs a trained adapter of the document (`dlm train configs/tutor.dlm`). In one run it measures:

- first answer: `dlm prompt DOC QUESTION --max-tokens 40` as a fresh process, from its start to the
  first byte of the answer on stdout (imports, checks, load, generation), and to its exit;
- batch: `dlm prompt --file` with 16 of the document's questions, time per answer after the one
  load: the functions the command calls (`infer.load_for_answers`, `infer.answer`) timed in this
  process;
- chat: `dlm chat` turns with the history kept, time per answer after the one load
  (`infer.chat_turn`, as the command calls it);
- where a first answer's time goes: the steps of `dlm prompt` timed one by one in a fresh process.

`--before SRC` also times the first answer of another dlm source tree (for example an older commit:
`git archive HEAD dlm | tar -x -C /tmp/dlm-before`), run as `python -m dlm` with SRC first on the
path; the two versions' runs alternate, so a drift of a shared machine's load hits both alike.
Every figure is the median of `--repeat` runs, with the range.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUESTION = "What does `yield` do in a function?"
# Where a first answer's time goes: the steps of `dlm prompt`, timed in a fresh process.
STAGES = """
import sys, time, json
marks = [("start", time.perf_counter())]
def mark(name):
    marks.append((name, time.perf_counter()))
from pathlib import Path
import dlm.cli.app
from dlm.store import current
from dlm.train import basefolder
from dlm.use import infer
mark("python and dlm's modules (typer, rich, pydantic)")
doc, home, question, tokens = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
cur = current.current(doc, home)
folder = basefolder.materialize(cur.prepared.base, home)
mark("read, plan and verify the document's version")
infer.lean_runtime()
import torch
mark("import torch")
import transformers.modeling_utils, transformers.generation.utils
mark("import transformers' model and generation modules")
loaded = infer.load_for_answers(cur.version_dir, folder)
mark("load tokenizer, base and adapter (PEFT), merge")
infer.answer(loaded, [question], cur.prepared.spec.system_prompt, max_new_tokens=tokens)
mark("generate the answer")
print(json.dumps([(name, t - marks[i][1]) for i, (name, t) in enumerate(marks[1:])]))
"""
NEW_TOKENS = 40
BATCH = 16
CHAT_TURNS = 6


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def first_answer(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """Seconds from the process start to the first byte on stdout, and to its exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    answered = time.perf_counter()
    rest, err = proc.communicate()
    ended = time.perf_counter()
    if proc.returncode or not first:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return answered - start, ended - start


def spread(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:.2f} s" if len(xs) == 1 else f"{med:.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def stages(doc: Path, home: Path, env: dict[str, str], cwd: str) -> list[tuple[str, float]]:
    """Seconds per step of a first answer (`STAGES`), in a fresh process."""
    import json

    cmd = [sys.executable, "-c", STAGES, str(doc), str(home), QUESTION, str(NEW_TOKENS)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the stages driver failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_process(doc: Path, home: Path, repeat: int) -> dict[str, list[float] | float]:
    """Batch and chat: per-answer seconds after one load, through the functions the commands call."""
    from dlm.store import current
    from dlm.train import basefolder
    from dlm.use import infer

    cur = current.current(doc, home)
    folder = basefolder.materialize(cur.prepared.base, home)
    system = cur.prepared.spec.system_prompt
    asked = [e.prompt for e in (*cur.prepared.train, *cur.prepared.heldout) if e.kind != "prose" and e.prompt]
    questions = (asked * (BATCH // max(1, len(asked)) + 1))[:BATCH]

    loaded = infer.load_for_answers(cur.version_dir, folder)  # adapter merged, as `dlm prompt --file`
    batch, tokens = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        rows = infer.answer(loaded, questions, system, max_new_tokens=NEW_TOKENS)
        batch.append((time.perf_counter() - start) / len(questions))
        tokens += [len(loaded.tokenizer(text=r["adapter"])["input_ids"]) for r in rows]
    del loaded

    loaded = infer.load_for_answers(cur.version_dir, folder, adapter=True, base=True)  # as `dlm chat`
    chat, chat_tokens = [], []
    for _ in range(repeat):
        session = infer.Chat(loaded, system, max_new_tokens=NEW_TOKENS)
        for question in asked[:CHAT_TURNS]:
            start = time.perf_counter()
            turn = infer.chat_turn(session, question)
            chat.append(time.perf_counter() - start)
            chat_tokens.append(len(loaded.tokenizer(text=turn.text)["input_ids"]))
    return {
        "batch": batch,
        "batch_tokens": statistics.mean(tokens),
        "chat": chat,
        "chat_tokens": statistics.mean(chat_tokens),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", type=Path, default=REPO / "configs" / "tutor.dlm")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", type=Path, help="another dlm source tree to time the first answer of")
    args = ap.parse_args()
    home = Path(os.environ.get("DLM_HOME") or Path.home() / ".dlm").resolve()
    doc = args.doc.resolve()
    env = {**os.environ, "DLM_HOME": str(home), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    ask = ["prompt", str(doc), QUESTION, "--max-tokens", str(NEW_TOKENS)]
    dlm = str(Path(sys.executable).with_name("dlm"))
    loads = [load_average()]

    now, before, steps = [], [], []
    with tempfile.TemporaryDirectory() as cwd:  # not the repository: `python -m dlm` must find SRC first
        for _ in range(args.repeat):
            now.append(first_answer([dlm, *ask], env, cwd))
            if args.before:
                old_env = {**env, "PYTHONPATH": str(args.before.resolve())}
                before.append(first_answer([sys.executable, "-m", "dlm", *ask], old_env, cwd))
            steps.append(stages(doc, home, env, cwd))
    loads.append(load_average())
    timed = in_process(doc, home, args.repeat)
    loads.append(load_average())

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    print(
        f"machine: {cpu}, {os.cpu_count()} cores; load average at start, after the processes, at the end: {' / '.join(loads)}"
    )
    print(f"document: {doc.name}; question: {QUESTION!r}; at most {NEW_TOKENS} new tokens; {args.repeat} runs each")
    print()
    head = "| measure | this tree |" + (" before |" if before else "")
    print(head)
    print("|---|---|" + ("---|" if before else ""))
    rows = [
        ("first answer, `dlm prompt` (start to answer)", [a for a, _ in now], [a for a, _ in before]),
        ("`dlm prompt` start to exit", [e for _, e in now], [e for _, e in before]),
    ]
    for label, mine, theirs in rows:
        print(f"| {label} | {spread(mine)} |" + (f" {spread(theirs)} |" if before else ""))
    one_process = " one process per question |" if before else ""
    print(
        f"| per answer, batch of {BATCH} (mean {timed['batch_tokens']:.0f} new tokens) | {spread(timed['batch'])} |"
        + one_process
    )
    print(
        f"| per answer, chat with history (mean {timed['chat_tokens']:.0f} new tokens) | {spread(timed['chat'])} |"
        + (" no chat |" if before else "")
    )
    print()
    print("| a first answer's steps (fresh process) | seconds |")
    print("|---|---|")
    for i, (name, _) in enumerate(steps[0]):
        print(f"| {name} | {spread([run[i][1] for run in steps])} |")


if __name__ == "__main__":
    main()
