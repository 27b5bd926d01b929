"""Slow tier (`make test-slow`): the embedded SmolLM2-135M-Instruct, trained for real on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.tinymodel import smollm2_base

pytestmark = pytest.mark.slow
DLM = str(Path(sys.executable).with_name("dlm"))


def test_a_short_tutor_run_ends_below_the_base_on_held_out_loss(tmp_path: Path) -> None:
    smollm2_base()  # converted once per machine into the test cache; share it instead of converting again
    (tmp_path / "bases").symlink_to(Path(os.environ.get("DLM_TEST_CACHE") or CONFIGS.parent / ".dlm-home") / "bases")
    env = {**os.environ, "DLM_HOME": str(tmp_path)}
    proc = subprocess.run(
        [DLM, "train", str(CONFIGS / "tutor.dlm"), "--max-steps", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(
        subprocess.run(
            [DLM, "show", str(CONFIGS / "tutor.dlm"), "--json"], env=env, capture_output=True, text=True, check=True
        ).stdout
    )
    metrics = info["runs"][-1]["metrics"]
    assert metrics["steps"] == 12
    assert metrics["eval_loss"] < metrics["base_eval_loss"], metrics
    answer = subprocess.run(
        [DLM, "prompt", str(CONFIGS / "tutor.dlm"), "What is a decorator?", "--max-tokens", "24"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr


def test_the_preference_example_prefers_the_house_style_more_than_the_base(tmp_path: Path) -> None:
    """configs/preference.dlm (SFT on 4 pairs, then DPO on 24 triples, reference = the base): on its
    6 pinned held-out triples the adapter prefers the chosen (SI) answer clearly more often than the base
    does (at least two triples more), and its implicit reward margin over the base is positive
    (docs/preference.md, "Measured figures")."""
    smollm2_base()
    (tmp_path / "bases").symlink_to(Path(os.environ.get("DLM_TEST_CACHE") or CONFIGS.parent / ".dlm-home") / "bases")
    env = {**os.environ, "DLM_HOME": str(tmp_path)}
    doc = str(CONFIGS / "preference.dlm")
    proc = subprocess.run([DLM, "train", doc], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(
        subprocess.run([DLM, "show", doc, "--json"], env=env, capture_output=True, text=True, check=True).stdout
    )
    metrics = json.loads((Path(info["versions"][-1]["path"]) / "metrics.json").read_text())
    print(
        {k: metrics.get(k) for k in ("pref_n", "pref_accuracy", "base_pref_accuracy", "reward_margin", "seconds")},
        [ln for ln in proc.stdout.splitlines() if "preference" in ln.lower()][-2:],
    )
    assert metrics["pref_n"] == 6
    assert metrics["pref_accuracy"] - metrics["base_pref_accuracy"] >= 2 / 6 - 1e-9, metrics
    assert metrics["reward_margin"] > 0, metrics
