"""`dlm prompt` and `dlm chat` show the prompt plan's findings about answering (today
`dora-unmerged-inference`), and the planner's purpose is a Literal that the type check enforces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.doc.schema import new_id

REPO = Path(__file__).resolve().parent.parent
DLM = str(Path(sys.executable).with_name("dlm"))
QA = "\n".join(f"### Q\nWhat is item {i}?\n### A\nItem {i} is number {i * 7}.\n" for i in range(6))


def run(*args: str, home: Path, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "DLM_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run([DLM, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def trained(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A LoRA and a DoRA twin of one tiny document, each trained for two steps."""
    out = {}
    for adapter in ("lora", "dora"):
        home = tmp_path_factory.mktemp(f"home-{adapter}")
        doc = workdir / f"items-{adapter}.dlm"
        doc.write_text(
            f"---\ndlm_id: {new_id()}\nbase_model: ./tiny\ntraining:\n  adapter: {adapter}\n  max_steps: 2\n"
            f"  micro_batch_size: 2\n  grad_accum: 1\n  sequence_len: 64\n  report: 0\n---\n# Items\n\n"
            f"::instruction::\n{QA}\n"
        )
        run("train", doc.name, home=home, cwd=workdir)
        out[adapter] = (doc, home)
    return out


@pytest.mark.integration
def test_prompt_and_chat_show_the_dora_inference_finding(trained) -> None:
    doc, home = trained["dora"]
    proc = run("prompt", doc.name, "What is item 1?", "--max-tokens", "2", home=home, cwd=doc.parent)
    assert "info dora-unmerged-inference: DoRA adapter" in proc.stderr
    assert "dora-unmerged-inference" not in proc.stdout  # the answer stays clean on stdout
    data = json.loads(
        run("prompt", doc.name, "What is item 1?", "--max-tokens", "2", "--json", home=home, cwd=doc.parent).stdout
    )
    assert [f["code"] for f in data["findings"]] == ["dora-unmerged-inference"]
    chat = run("chat", doc.name, "--max-tokens", "2", home=home, cwd=doc.parent, stdin="/quit\n")
    assert "dora-unmerged-inference" in chat.stderr
    quiet = run("-q", "prompt", doc.name, "What is item 1?", "--max-tokens", "2", home=home, cwd=doc.parent)
    assert "dora-unmerged-inference" not in quiet.stderr


@pytest.mark.integration
def test_a_lora_adapter_has_no_inference_finding(trained) -> None:
    doc, home = trained["lora"]
    proc = run("prompt", doc.name, "What is item 1?", "--max-tokens", "2", "--json", home=home, cwd=doc.parent)
    assert json.loads(proc.stdout)["findings"] == []
    assert "dora-unmerged-inference" not in proc.stderr


SNIPPET = """
from dlm.plan.hardware import probe_light
from dlm.plan.prepare import prepare

prepare("doc.dlm", probe_light(), purpose={purpose!r})
"""


@pytest.mark.parametrize("purpose, ok", [("inspect", True), ("prompt", True), ("inspekt", False)])
def test_the_purpose_is_checked_statically(tmp_path: Path, purpose: str, ok: bool) -> None:
    """mypy (as `make lint` runs it, with the repository's configuration) refuses a purpose outside
    the Literal; the planner's own callers pass the check (that is `make lint`'s run over dlm/)."""
    from mypy import api

    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET.format(purpose=purpose))
    stdout, _, status = api.run(
        ["--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(REPO / ".mypy_cache"), str(snippet)]
    )
    if ok:
        assert status == 0, stdout
    else:
        assert status == 1 and 'Argument "purpose" to "prepare" has incompatible type' in stdout, stdout
