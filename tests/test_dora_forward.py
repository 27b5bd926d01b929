"""`dora_forward`: dlm's DoRA training forward or PEFT's own, decided from the spec and the installed PEFT.

Unit tier (no torch): the pure decision (`dlm.plan.dora`), the plan's decision, runtime kwargs and
warn finding `dora-forward-peft-version` (trigger and near misses), the schema key, the version read
from package metadata, the pins in pyproject / constraints.txt, and how `dlm train` prints a run
that fell back. The run-time guards (parity self-check, fallback) are in tests/test_dora_fast.py
and tests/test_train.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FIXTURES, REPO

from dlm.doc.grammar import parse_doc
from dlm.doc.schema import Training, parse_spec
from dlm.errors import DlmErrors
from dlm.plan import bases
from dlm.plan.corpus import CorpusStats
from dlm.plan.dora import PEFT_RANGE, PEFT_RANGE_TEXT, decide_forward, peft_in_range, release
from dlm.plan.hardware import HardwareFacts, load_fixture
from dlm.plan.planner import Plan, make_plan

ID = "01KAV3J8ZP4N6Q2R7S9T0W1X2Y"
CODE = "dora-forward-peft-version"


def _plan(peft: str | None = "0.21.2", machine: str = "a100-40g", purpose: str = "train", **training) -> Plan:
    hw = dataclasses.replace(load_fixture(FIXTURES / "hardware" / f"{machine}.json"), peft_version=peft)
    spec = parse_spec({"dlm_id": ID, "training": training})
    stats = CorpusStats(
        n_train=40, n_heldout=4, train_tokens=2400, max_tokens=120, n_prose=10, n_instruction=30, exact=False
    )
    return make_plan(spec, hw, bases.resolve("smollm2-135m"), stats, purpose=purpose)


# --- the pure decision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "inside"),
    [
        ("0.21.2", True),
        ("0.21.0", True),
        ("0.21.17", True),
        ("0.22.0", False),
        ("0.22.0.dev0", False),
        ("0.20.1", False),
        ("0.17.0", False),
        ("1.0.0", False),
        ("not-a-version", False),
        (None, None),
    ],
)
def test_peft_range(given: str | None, inside: bool | None) -> None:
    assert peft_in_range(given) is inside


def test_release_reads_major_minor() -> None:
    assert release("0.21.2") == (0, 21) and release("v1.2rc1") == (1, 2) and release("dev") is None
    assert PEFT_RANGE_TEXT == f">={PEFT_RANGE[0][0]}.{PEFT_RANGE[0][1]},<{PEFT_RANGE[1][0]}.{PEFT_RANGE[1][1]}"


@pytest.mark.parametrize(
    ("training", "peft", "forward", "words"),
    [
        (dict(lora_dropout=0.0), "0.21.2", "dlm", "PEFT 0.21.2 is within >=0.21,<0.22"),
        (dict(lora_dropout=0.1, dora_dropout="branch"), "0.21.2", "dlm", "checked against PEFT's forward"),
        (dict(lora_dropout=0.0), None, "dlm", "not known"),
        (dict(lora_dropout=0.1, dora_dropout="input"), "0.21.2", "peft", "PEFT's form"),
        (dict(lora_dropout=0.0), "0.23.0", "peft", "outside >=0.21,<0.22"),
        (dict(lora_dropout=0.0, dora_forward="peft"), "0.21.2", "peft", "spec: PEFT's own DoRA forward"),
        (dict(lora_dropout=0.1, dora_dropout="branch", dora_forward="peft"), "0.21.2", "peft", "not applied"),
    ],
)
def test_decide_forward(training: dict, peft: str | None, forward: str, words: str) -> None:
    t = Training(adapter="dora", **training)
    got, why = decide_forward(t, peft, t.model_fields_set)
    assert got == forward and words in why, why


# --- the plan: decision, runtime kwargs, finding -------------------------------------------------


def test_out_of_range_peft_plans_peft_forward_with_a_warning() -> None:
    p = _plan("0.23.0", adapter="dora", lora_dropout=0.0)
    assert p.decision("dora_forward") == "peft"
    assert "dora_dropout" not in p.runtime_kwargs and "dora_norm" not in p.runtime_kwargs
    (f,) = [f for f in p.findings if f.code == CODE]
    assert f.level == "warn" and f.evidence == {"peft_version": "0.23.0", "tested": PEFT_RANGE_TEXT}
    assert "dora_forward: peft" in f.hint and f"{CODE}(peft=0.23.0)" in p.reason
    # the dropout decision no longer promises the factored norm
    assert "from factors" not in next(d.reason for d in p.decisions if d.key == "dora_dropout")


@pytest.mark.parametrize(
    ("peft", "kwargs"),
    [
        ("0.21.2", dict(adapter="dora", lora_dropout=0.0)),  # in range
        (None, dict(adapter="dora", lora_dropout=0.0)),  # not known (a fixture without it): no claim
        ("0.23.0", dict(adapter="dora", lora_dropout=0.0, dora_forward="peft")),  # PEFT's chosen anyway
        ("0.23.0", dict(adapter="dora", lora_dropout=0.1, dora_dropout="input")),  # PEFT's form anyway
        ("0.23.0", dict(adapter="lora")),  # no DoRA
    ],
)
def test_version_warning_near_misses(peft: str | None, kwargs: dict) -> None:
    p = _plan(peft, **kwargs)
    assert CODE not in {f.code for f in p.findings}


def test_version_warning_only_when_training() -> None:
    assert CODE in {f.code for f in _plan("0.23.0", adapter="dora").findings}
    assert CODE not in {f.code for f in _plan("0.23.0", adapter="dora", purpose="prompt").findings}


def test_in_range_plans_dlm_forward() -> None:
    p = _plan("0.21.2", adapter="dora", lora_dropout=0.0)
    assert p.decision("dora_forward") == "dlm"
    assert p.runtime_kwargs == {"dora_dropout": "branch", "dora_norm": "factored"}


def test_dora_forward_peft_keeps_peft_and_is_charged_its_second_matmul() -> None:
    """`dora_forward: peft` wins over `dora_dropout: branch`: PEFT's forward, no runtime switch, and the
    step estimate pays PEFT's second base matmul at dropout > 0."""
    dlm = _plan(adapter="dora", lora_dropout=0.1, dora_dropout="branch")
    peft = _plan(adapter="dora", lora_dropout=0.1, dora_dropout="branch", dora_forward="peft")
    assert (dlm.decision("dora_forward"), peft.decision("dora_forward")) == ("dlm", "peft")
    assert dlm.runtime_kwargs.get("dora_dropout") == "branch" and "dora_dropout" not in peft.runtime_kwargs
    assert "not applied" in next(d.reason for d in peft.decisions if d.key == "dora_dropout")
    assert peft.estimates.step_seconds > dlm.estimates.step_seconds
    assert "dora_forward" not in {d.key for d in _plan(adapter="lora").decisions}


def test_dora_forward_shows_in_doctor(tmp_path: Path, home: Path) -> None:
    """`dlm doctor` prints the decision and its reason (the real CLI, in a subprocess: no torch)."""
    doc = tmp_path / "dora.dlm"
    doc.write_text(
        f"---\ndlm_id: {ID}\ntraining:\n  adapter: dora\n  dora_forward: peft\n---\n"
        "::instruction::\n### Q\nWhat is two and two?\n### A\nFour.\n"
    )
    env = {**os.environ, "COLUMNS": "400"}  # one table row per line
    table, data = (
        subprocess.run(
            [sys.executable, "-m", "dlm", "doctor", *args, str(doc)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        for args in ((), ("--json",))
    )
    assert table.returncode == data.returncode == 0, table.stderr
    assert re.search(r"dora_forward\s*│\s*peft\s*│\s*spec: PEFT's own DoRA forward", table.stdout), table.stdout
    (decision,) = [d for d in json.loads(data.stdout)["files"][0]["plan"]["decisions"] if d["key"] == "dora_forward"]
    assert decision["value"] == "peft" and decision["reason"].startswith("spec: PEFT's own DoRA forward")


# --- the schema key ------------------------------------------------------------------------------


def test_schema_key_default_and_values() -> None:
    assert Training().dora_forward == "dlm"
    assert Training(dora_forward="peft").dora_forward == "peft"
    front = f"---\ndlm_id: {ID}\ntraining:\n  adapter: dora\n  dora_forward: fast\n---\n"
    d = parse_doc(front + "text\n", "t.dlm")
    with pytest.raises(DlmErrors) as info:
        parse_spec(d.frontmatter, d.positions, d.path)
    (err,) = info.value.errors
    assert (err.path, err.line, err.col) == ("t.dlm", 5, 3)
    assert "dora_forward" in err.message and "dlm | peft" in (err.hint or "")


# --- where the version comes from, and the pins -------------------------------------------------


def test_light_probe_reads_peft_version_without_importing_it() -> None:
    code = (
        "import sys\nfrom dlm.plan.hardware import probe_light\n"
        "print(probe_light().peft_version, 'peft' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.split() == [version("peft"), "False"]


def test_hardware_file_peft_version_type_is_checked() -> None:
    data = load_fixture(FIXTURES / "hardware" / "cpu.json").to_json()
    assert HardwareFacts.from_json(data).peft_version == "0.21.2"
    with pytest.raises(ValueError, match="peft_version"):
        HardwareFacts.from_json({**data, "peft_version": 21})


def test_pins_agree_with_the_tested_range() -> None:
    """pyproject's upper bound on peft is the fast path's, and constraints.txt pins a release inside it."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (peft,) = [d for d in deps if re.match(r"peft\b", d)]
    upper = re.search(r"<\s*([\d.]+)", peft)
    assert upper and release(upper[1]) == PEFT_RANGE[1], peft
    pin = re.search(r"^peft==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    assert pin and peft_in_range(pin[1]), pin


# --- a run that fell back says so ----------------------------------------------------------------


def test_train_output_shows_a_fallback() -> None:
    """`dlm train` prints the `dora_forward` event as a note and a summary's run-time findings as lines."""
    from io import StringIO

    from rich.console import Console

    from dlm.cli import render
    from dlm.cli.app import _NOTES
    from dlm.train.run import RunSummary

    note = _NOTES["dora_forward"]({"forward": "peft", "layers": 0, "reason": "dlm's DoRA forward failed ..."})
    assert note.startswith("DoRA: PEFT's own forward (dlm's DoRA forward failed")
    assert "on 8 layers" in _NOTES["dora_forward"]({"forward": "dlm", "layers": 8, "reason": "passed"})
    finding = {"level": "warn", "code": "dora-forward-parity", "message": "fell back", "hint": "", "evidence": {}}
    numbers = dict(steps=1, max_steps=2, seconds=1.0, tokens_seen=0, peak_memory_bytes=0, trainable_params=1)
    nothing = dict(train_loss=None, eval_loss=None, base_eval_loss=None, steady_step_seconds=None, adapter_dir=None)
    summary = RunSummary("interrupted", **numbers, **nothing, total_params=2, checkpoint="c", findings=(finding,))
    assert summary.to_json()["findings"] == [finding]
    buf = StringIO()
    outcome = SimpleNamespace(summary=summary, store=SimpleNamespace(root=Path("s")), prepared=None)
    outcome.prepared = SimpleNamespace(doc=SimpleNamespace(path="t.dlm"))
    render.trained(Console(file=buf, width=200), outcome, None)
    assert "warn dora-forward-parity: fell back" in buf.getvalue()
