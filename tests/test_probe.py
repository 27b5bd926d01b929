"""`dlm doctor FILE --probe N`: real steps replace the estimates, and nothing reaches the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from tests.tinymodel import tiny_base

pytestmark = pytest.mark.integration

DOC = """---
dlm_id: 01KAV3J8ZP4N6Q2R7S9T0W1X2Y
base_model: {base}
training:
  precision: fp32
  sequence_len: 128
  num_epochs: 5
---
# Decorators

A decorator takes a function and returns a new one that wraps it. Generators produce values lazily.

::instruction::
### Q
What is a decorator?
### A
A function that wraps another function.
### Q
What does yield do?
### A
It makes the function a generator.
### Q
What is pip?
### A
The installer for Python packages.
"""


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    base = tiny_base(folder / "base")
    path = folder / "notes.dlm"
    path.write_text(DOC.format(base=base))
    return path


def test_probe_replaces_estimates_with_measurements(doc: Path, tmp_path: Path) -> None:
    from dlm.plan.doctor import diagnose
    from dlm.train import device
    from dlm.train.probe import probe_file

    hw = device.probe()
    planned = diagnose(doc, hw, tmp_path / "home").plan.estimates  # counted as the probe counts
    d = probe_file(doc, hw, tmp_path / "home", 4)
    est, p = d.plan.estimates, d.probe
    assert est.measured and not planned.measured
    assert p["steps"] == 4 and est.step_seconds == p["steady_step_seconds"] > 0
    assert est.total_seconds == pytest.approx(est.optimizer_steps * est.step_seconds, rel=1e-2, abs=0.06)  # 0.1 s
    assert est.optimizer_steps == planned.optimizer_steps  # the projection is for the whole run, not the probe
    assert est.peak_memory_bytes == p["peak_memory_bytes"] > 0
    assert p["estimated_step_seconds"] == planned.step_seconds
    assert p["estimated_peak_memory_bytes"] == planned.peak_memory_bytes
    assert p["tokens_per_second"] > 0
    assert not (tmp_path / "home" / "store").exists()  # nothing written to the store
    data = d.to_json()
    assert data["probe"] == p and data["plan"]["estimates"]["measured"] is True


def test_cli_probe_json_and_refusals(doc: Path, tmp_path: Path) -> None:
    def dlm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "dlm", "--home", str(tmp_path), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )

    res = dlm("doctor", str(doc), "--probe", "3", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    file = json.loads(res.stdout)["files"][0]
    assert file["plan"]["estimates"]["measured"] is True and file["probe"]["steps"] == 3
    assert not (tmp_path / "store").exists()
    text = dlm("doctor", str(doc), "--probe", "3")
    assert text.returncode == 0 and "probe: 3 steps" in text.stdout and "measured:" in text.stdout
    refused = dlm("doctor", "--probe", "3")
    assert refused.returncode == 2 and "hint:" in refused.stderr
    assert dlm("doctor", str(doc), "--probe", "1").returncode == 2  # at least 3: 2 warm-up steps + 1
