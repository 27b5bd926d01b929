"""SIGKILL a training run at random moments, again and again, and check the store after each kill.

Run by tests/test_faults.py as `python tests/faultdriver.py DOC HOME --trials N --seed S`. The heavy
libraries are imported once here; each trial forks a child that runs `runs.train_document` (what
`dlm train` runs, minus the console) and the parent kills it with SIGKILL. That makes a trial cost
about a second of training instead of ~5 s of imports per `dlm train` process.

A trial's moment is one of:
- `random`: a uniform delay after the fork, between 5% and 95% of the time an uninterrupted run
  takes on this machine (loading, tokenising, stepping, saving, committing);
- `checkpoint`: as soon as a `checkpoint-N` folder exists without its `trainer_state.json`
  (the Trainer is writing it);
- `commit`: as soon as `versions/.vNNNN.tmp` exists (the store is assembling a version).
The child first tries `--resume` and, when there is nothing to resume, trains plainly: the
documented recovery after a crash (docs/reliability.md).

After every kill the parent checks the store as it lies on disk (the manifest parses; `adapter`
is absent or points at a version whose checksums hold), then takes the lock as the next
`dlm train` would and checks again (no run left `running`, no assembly folder left, the current
adapter is the newest complete version). First an uninterrupted run in a separate home sets the time
scale and the reference; at the end one run goes to completion in the killed home and its adapter
must equal the reference's byte for byte. Prints a JSON report; exits 1 with the failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train_child(doc: Path, home: Path, hw, log: Path) -> None:
    """In the forked child: resume when possible, else train plainly; never returns."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 0
    try:
        from dlm.errors import DlmError
        from dlm.train import runs

        try:
            runs.train_document(doc, home, hw, resume=True)
        except DlmError as exc:
            if "no interrupted run" not in exc.message:
                raise
            runs.train_document(doc, home, hw)
    except BaseException:
        traceback.print_exc()
        code = 3
    os._exit(code)


def store_of(home: Path, doc: Path):
    from dlm.doc.datafiles import read_doc
    from dlm.store.opening import open_store

    dlm_id = read_doc(doc).frontmatter["dlm_id"]
    return open_store(home, dlm_id, doc, "./tiny", readonly=True), dlm_id


def check_on_disk(home: Path, doc: Path) -> dict:
    """The state a kill leaves, before anyone repairs anything."""
    from dlm.store.integrity import verify

    store, _ = store_of(home, doc)
    manifest = store.load_manifest()  # RunError when the manifest is damaged
    current = store.current_version()
    if current is not None:
        verify(current)
    return {"current": current.name if current else None, "runs": len(manifest["runs"])}


def check_after_lock(home: Path, doc: Path) -> dict:
    """What the next `dlm train` sees once it holds the lock (and has reconciled)."""
    from dlm.errors import RunError
    from dlm.store.integrity import verify
    from dlm.store.opening import open_store

    _, dlm_id = store_of(home, doc)
    store = open_store(home, dlm_id, doc, "./tiny")
    with store.lock():
        manifest = store.load_manifest()
    assert not [r for r in manifest["runs"] if r["status"] == "running"], manifest["runs"]
    assert not list((store.root / "versions").glob(".v*.tmp")), "an assembly folder was left"
    complete = []
    for v in store.versions():
        try:
            verify(v)
            complete.append(v.name)
        except RunError:
            pass
    current = store.current_version()
    assert (current.name if current else None) == (complete[-1] if complete else None), (current, complete)
    assert manifest["current"] == (current.name if current else None), manifest["current"]
    return {
        "current": current.name if current else None,
        "versions": complete,
        "statuses": [r["status"] for r in manifest["runs"]],
    }


def poll(pid: int) -> int | None:
    """The child's wait status once it has ended (reaping it), else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return status if done else None


def half_written(root: Path) -> set[Path]:
    """Checkpoint folders without their trainer_state.json (being written, or left by an earlier kill)."""
    return {p for p in root.glob("runs/r*/checkpoints/checkpoint-*") if not (p / "trainer_state.json").exists()}


def wait_for(kind: str, deadline: float, pid: int, root: Path) -> tuple[bool, int | None]:
    """Poll until the moment of `kind` comes (True), the child exits (its status) or the deadline passes."""
    stale = half_written(root)  # only a checkpoint this child starts counts
    while time.monotonic() < deadline:
        status = poll(pid)
        if status is not None:
            return False, status
        if kind == "random":
            pass
        elif kind == "checkpoint" and half_written(root) - stale:
            return True, None
        elif kind == "commit" and any(root.glob("versions/.v*.tmp")):
            return True, None
        time.sleep(0.002)
    return kind == "random", None


def trial(i: int, kind: str, delay: float, doc: Path, home: Path, hw, logs: Path) -> dict:
    root = store_of(home, doc)[0].root
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        train_child(doc, home, hw, logs / f"trial{i:02d}.log")
    hit, status = wait_for(kind, t0 + (delay if kind == "random" else 120), pid, root)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    outcome = "killed" if os.WIFSIGNALED(status) else f"exited {os.WEXITSTATUS(status)}"
    if outcome not in ("killed", "exited 0"):
        raise AssertionError(f"trial {i}: the child failed\n" + (logs / f"trial{i:02d}.log").read_text()[-3000:])
    report = {
        "trial": i,
        "kind": kind,
        "delay": round(delay, 2),
        "hit": hit,
        "outcome": outcome,
        "seconds": round(time.monotonic() - t0, 2),
    }
    report["on_disk"] = check_on_disk(home, doc)
    report["after_lock"] = check_after_lock(home, doc)
    return report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("doc", type=Path)
    ap.add_argument("home", type=Path)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    doc, home = args.doc.resolve(), args.home.resolve()
    logs = home / "trial-logs"
    logs.mkdir(parents=True, exist_ok=True)

    import peft  # noqa: F401 - import the heavy stack once, before any fork
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from dlm.train import device

    hw = device.probe()
    rng = random.Random(args.seed)
    kinds = ["random"] * args.trials
    for at, kind in ((2, "checkpoint"), (5, "commit"), (7, "checkpoint"), (args.trials - 1, "commit")):
        if at < args.trials:
            kinds[at] = kind
    reports = []
    try:
        # The reference: one uninterrupted run, which also says how long a run takes here.
        reference_home = home.parent / (home.name + "-reference")
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            train_child(doc, reference_home, hw, logs / "reference.log")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (logs / "reference.log").read_text()[-3000:]
        full = time.monotonic() - t0
        for i, kind in enumerate(kinds):
            reports.append(trial(i, kind, rng.uniform(0.05, 0.95) * full, doc, home, hw, logs))
        # Finish: whatever the kills left, --resume (or a plain train) completes the run.
        pid = os.fork()
        if pid == 0:
            train_child(doc, home, hw, logs / "final.log")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (logs / "final.log").read_text()[-3000:]
        final = check_after_lock(home, doc)
        store, _ = store_of(home, doc)
        reference, _ = store_of(reference_home, doc)
        summary = json.loads((store.current_version() / "summary.json").read_text())
        weights = (store.current_version() / "adapter_model.safetensors").read_bytes()
        same = weights == (reference.current_version() / "adapter_model.safetensors").read_bytes()
        log = [json.loads(x) for x in (store.current_version() / "log.jsonl").read_text().splitlines()]
        steps = [x["step"] for x in log if "loss" in x]
        print(
            json.dumps(
                {
                    "trials": reports,
                    "final": final,
                    "steps": summary["steps"],
                    "full_run_s": round(full, 2),
                    "resumed_from": summary.get("resumed_from"),
                    "same_as_uninterrupted": same,
                    "logged_steps": steps,
                },
                indent=1,
            )
        )
        assert steps == list(range(1, summary["steps"] + 1)), steps
        assert same, "the adapter after the kills differs from an uninterrupted run's"
    except Exception:
        print(json.dumps({"trials": reports}, indent=1))
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
