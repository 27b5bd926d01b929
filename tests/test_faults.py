"""Faults on the tiny model: kills, a full disk, NaN, damaged stores, tampered checkpoints, remote code.

Every case ends the same way: one clear error (exit 1 or 2, a `hint:` line, no traceback), and a
store that still parses, whose current adapter is the last complete version and verifies.
docs/reliability.md lists each case with what dlm does.

Most cases run the CLI in this process (`cli.main` with argv set), so the heavy imports are paid
once; the ones that are about processes (SIGKILL, two trainers, "never loaded") use subprocesses.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlm.store.integrity import verify
from dlm.store.opening import open_store
from tests.test_commands import DLM, write_doc

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> tuple[int, str, str]:
    """`dlm ARGS` in this process: (exit code, stdout, stderr)."""
    from dlm.cli import app as cli_module

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["dlm", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
            cli_module.main()
    finally:
        sys.argv = argv
    code = stop.value.code if isinstance(stop.value.code, int) else 0
    return code, out.getvalue(), err.getvalue()


def dlm_id(doc: Path) -> str:
    return doc.read_text().split("dlm_id: ")[1].split()[0]


def manifest(home: Path, doc: Path) -> dict:
    return json.loads((home / "store" / dlm_id(doc) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def trained(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(document, home) with one good version, v0001; tests copy the home before harming it."""
    home = tmp_path_factory.mktemp("trained-home")
    doc = write_doc(workdir, "faults.dlm")
    code, out, err = cli("--home", str(home), "train", str(doc))
    assert code == 0, (out[-2000:], err[-2000:])
    return doc, home


@pytest.fixture
def home(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    """A private copy of the trained home."""
    copy = tmp_path / "home"
    shutil.copytree(trained[1], copy, symlinks=True)
    return copy


def assert_intact(home: Path, doc: Path, current: str | None = "v0001") -> dict:
    """The manifest parses, the current adapter is `current` and verifies, nothing half-made is left."""
    store = open_store(home, dlm_id(doc), doc, "./tiny", readonly=True)
    m = store.load_manifest()
    folder = store.current_version()
    assert (folder.name if folder else None) == current and m["current"] == current
    if folder is not None:
        verify(folder)
    assert not list((store.root / "versions").glob(".v*.tmp"))
    return m


def refused(code: int, err: str, exit_code: int, *needles: str) -> None:
    assert code == exit_code, err
    assert "Traceback" not in err and "hint: " in err, err
    for needle in needles:
        assert needle in err, err


# ---------------------------------------------------------------- SIGKILL at random moments


def test_sigkill_at_random_moments_then_resume(workdir: Path, tmp_path: Path) -> None:
    """12 trials of a 30-step run (a checkpoint every step), killed at random delays, while a
    checkpoint is being written and while a version is being assembled; the store is checked after
    each kill, and the run finished afterwards equals an uninterrupted one byte for byte."""
    doc = write_doc(workdir, "killed.dlm", steps=30, extra="  save_steps: 1\n  precision: fp32\n")
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "faultdriver.py"),
            str(doc),
            str(tmp_path / "home"),
            "--trials",
            "12",
            "--seed",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    report = json.loads(proc.stdout)
    kills = [t for t in report["trials"] if t["outcome"] == "killed"]
    assert len(report["trials"]) == 12 and len(kills) >= 6, report["trials"]
    assert report["steps"] == 30 and report["same_as_uninterrupted"]
    print(
        f"\n{len(kills)} kills of 12 trials in {time.monotonic() - t0:.0f} s (a whole run: {report['full_run_s']} s); "
        f"moments: {[(t['kind'], t['seconds']) for t in kills]}"
    )


# ---------------------------------------------------------------- a damaged store


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle: same size, different sha256
    path.write_bytes(bytes(data))


def _repoint(root: Path) -> None:
    (root / "adapter").unlink()
    (root / "adapter").symlink_to("versions/v0009")


DAMAGE = {  # case -> (what to do to the store root, what the error says)
    "manifest-truncated": (lambda r: _truncate(r / "manifest.json"), "manifest is damaged"),
    "manifest-garbage": (lambda r: (r / "manifest.json").write_bytes(b"\x00\xffnot json"), "manifest"),
    "manifest-emptied": (lambda r: (r / "manifest.json").write_text(""), "manifest is damaged"),
    "adapter-file-missing": (
        lambda r: (r / "versions/v0001/adapter_model.safetensors").unlink(),
        "adapter_model.safetensors is missing",
    ),
    "adapter-file-truncated": (
        lambda r: _truncate(r / "versions/v0001/adapter_model.safetensors", 0.9),
        "adapter_model.safetensors has",
    ),
    "adapter-bytes-edited": (
        lambda r: _flip(r / "versions/v0001/adapter_model.safetensors"),
        "adapter_model.safetensors was modified",
    ),
    "adapter-config-edited": (
        lambda r: _flip(r / "versions/v0001/adapter_config.json"),
        "adapter_config.json was modified",
    ),
    "checksums-missing": (lambda r: (r / "versions/v0001/files.json").unlink(), "files.json, its checksum record"),
    "pointer-dangling": (_repoint, "not a version"),
}
# Runs the CLI in a child and reports, at exit, whether the adapter stack was ever imported.
PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('\\nLOADED=%s\\n' % any(m in sys.modules for m in ('peft', 'torch'))))\n"
    "from dlm.cli.app import main\nsys.argv = ['dlm'] + sys.argv[1:]\nmain()\n"
)


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_store_is_reported_and_never_loaded(trained, home: Path, case: str) -> None:
    doc, _ = trained
    damage, message = DAMAGE[case]
    root = home / "store" / dlm_id(doc)
    damage(root)
    env = {**os.environ, "DLM_HOME": str(home), "COLUMNS": "200"}
    for args in (["show", str(doc)], ["prompt", str(doc), "What is item 3?"]):
        proc = subprocess.run(
            [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120, cwd=doc.parent
        )
        refused(proc.returncode, proc.stderr, 1, message)
        assert "LOADED=False" in proc.stderr, f"{args[0]} imported torch/peft for a damaged store"
        assert "hint: " in proc.stderr and ("dlm train" in proc.stderr or "mv " in proc.stderr), proc.stderr


def test_training_on_a_damaged_manifest_stops_with_the_repair_hint(trained, home: Path) -> None:
    doc, _ = trained
    manifest_path = home / "store" / dlm_id(doc) / "manifest.json"
    _truncate(manifest_path)
    before = manifest_path.read_bytes()
    code, _, err = cli("--home", str(home), "train", str(doc))
    refused(code, err, 1, "manifest is damaged", "mv ")
    assert manifest_path.read_bytes() == before  # nothing was "repaired" by guessing


# ---------------------------------------------------------------- NaN, full disk


def test_nan_loss_marks_the_run_failed_and_keeps_the_current_adapter(trained, home: Path, monkeypatch) -> None:
    from dataclasses import replace

    from dlm.train import run as train

    doc, _ = trained
    real = train.run

    def exploding(plan, *args, **kwargs):  # a learning rate no schema accepts: the loss turns NaN
        return real(
            replace(plan, sft_kwargs={**plan.sft_kwargs, "learning_rate": 1e30, "max_grad_norm": 0.0}), *args, **kwargs
        )

    monkeypatch.setattr(train, "run", exploding)
    code, _, err = cli("--home", str(home), "train", str(doc))
    refused(code, err, 1, "the run failed", "unchanged (v0001)")
    m = assert_intact(home, doc)
    assert m["runs"][-1]["status"] == "failed" and m["runs"][-1]["version"] is None


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize("where", ["manifest", "version", "checkpoint"])
def test_a_full_disk_gives_a_clear_error_and_corrupts_nothing(trained, home: Path, monkeypatch, where: str) -> None:
    """ENOSPC while recording the run (manifest), while assembling the version (its JSON files), or
    inside torch's checkpoint writer (which reports it as RuntimeError "... file write failed")."""
    import torch

    from dlm.store import durable

    doc, _ = trained
    manifest_path = home / "store" / dlm_id(doc) / "manifest.json"
    before = manifest_path.read_bytes()
    real_write = durable.write_json

    def write_json(path, data):
        if (where == "manifest" and path.name == "manifest.json") or (
            where == "version" and path.parent.name.startswith(".v")
        ):
            raise _no_space(path)
        return real_write(path, data)

    def save(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
            "data/0: file write failed"
        )

    monkeypatch.setattr(durable, "write_json", write_json)
    if where == "checkpoint":
        monkeypatch.setattr(torch, "save", save)
    code, _, err = cli("--home", str(home), "train", str(doc))
    monkeypatch.undo()
    refused(code, err, 1, "a disk write failed", "current adapter is unchanged (v0001)")
    m = assert_intact(home, doc)
    if where == "manifest":
        assert manifest_path.read_bytes() == before  # the run could not even be recorded
    else:
        assert m["runs"][-1]["status"] == "failed" and len(m["runs"]) == 2
    store = open_store(home, dlm_id(doc), doc, "./tiny", readonly=True)
    # A half-written checkpoint is never offered to --resume; a run that trained to the end and failed
    # only while saving the version keeps its complete checkpoints, so --resume finishes it at once.
    resumable = store.latest_checkpoint()
    assert (resumable is not None) == (where == "version"), resumable
    again = ["--resume"] if resumable else []
    code, out, err = cli("--home", str(home), "train", str(doc), *again)  # space is back: training works again
    assert code == 0, err
    assert_intact(home, doc, "v0002")


# ---------------------------------------------------------------- security


def test_a_tampered_checkpoint_is_refused_unread(trained, home: Path) -> None:
    """A checkpoint's optimizer.pt replaced by a pickle that would run a command: --resume reads it
    with torch.load(weights_only=True), which refuses it; the command never runs."""
    import torch

    from dlm.train import device, runs

    doc, _ = trained
    marker = home / "pwned"

    def stop_at_two(step, *rest):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # train.run saves a checkpoint at this step and stops

    outcome = runs.train_document(doc, home, device.probe(), max_steps=3, on_step=stop_at_two)
    assert outcome.summary.status == "interrupted"
    ckpt = open_store(home, dlm_id(doc), doc, "./tiny", readonly=True).latest_checkpoint()
    assert ckpt is not None and (ckpt / "optimizer.pt").is_file()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    code, _, err = cli("--home", str(home), "train", str(doc), "--max-steps", "3", "--resume")
    refused(code, err, 1, "refused unread", "--fresh")
    assert not marker.exists()
    assert_intact(home, doc)


def test_document_text_is_never_run_as_a_template(workdir: Path) -> None:
    """Questions, answers and system prompts pass through the base's Jinja chat template as message
    content: template syntax inside them is text, never evaluated."""
    from transformers import AutoTokenizer

    from dlm.train.rows import render_chat

    tok = AutoTokenizer.from_pretrained(str(workdir / "tiny"))
    question = "{{ 7 * 7 }} {% for i in range(3) %}loop{% endfor %} {{ cycler.__init__.__globals__ }}"
    head, completion = render_chat(tok, question, "{{ 6 * 6 }}", "{{ 5 * 5 }}")
    assert question in head and "{{ 5 * 5 }}" in head and completion.startswith("{{ 6 * 6 }}")
    assert "49" not in head and "looploop" not in head and "36" not in completion


def test_remote_code_shipped_with_a_base_never_runs(workdir: Path, tmp_path: Path) -> None:
    """A base folder whose config names its own Python classes (auto_map): with trust_remote_code
    off (the default) training uses the library's own Llama code and the shipped module never runs."""
    base = tmp_path / "tiny"
    shutil.copytree(workdir / "tiny", base)
    marker = tmp_path / "pwned"
    (base / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    pass\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **json.loads((base / "tokenizer_config.json").read_text()),
                "auto_map": {"AutoTokenizer": ["evil.EvilConfig", None]},
            }
        )
    )
    doc = write_doc(tmp_path, "remote.dlm", steps=1)
    code, out, err = cli("--home", str(tmp_path / "home"), "train", str(doc))
    assert code == 0, (out[-2000:], err[-2000:])
    assert not marker.exists(), "the base's own Python code ran"
    code, out, _ = cli("doctor", str(doc))
    assert "trust-remote-code" not in out
    doc.write_text(doc.read_text().replace("base_model: ./tiny\n", "base_model: ./tiny\ntrust_remote_code: true\n"))
    code, out, _ = cli("doctor", str(doc))  # turning it on is allowed, and warned about
    assert code == 0 and "trust-remote-code" in out


# ---------------------------------------------------------------- two trainers


def test_two_documents_train_side_by_side(workdir: Path, tmp_path: Path) -> None:
    """Different documents have different stores and locks: two `dlm train` at once both succeed."""
    env = {**os.environ, "DLM_HOME": str(tmp_path), "COLUMNS": "200"}
    docs = [write_doc(workdir, f"side-{i}.dlm", steps=4) for i in range(2)]
    procs = [
        subprocess.Popen(
            [DLM, "train", d.name], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for d in docs
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and "Traceback" not in err, (out[-2000:], err[-2000:])
    for d in docs:
        assert_intact(tmp_path, d)
        assert manifest(tmp_path, d)["runs"][-1]["status"] == "ok"
