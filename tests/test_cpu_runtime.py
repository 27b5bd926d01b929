"""dlm/cpu_runtime.py: the plan's CPU settings, applied in a fresh process (they last for the process)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, torch
from dlm.train import cpu_runtime
default = torch.get_num_threads()
done = cpu_runtime.apply(json.loads(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"default": default, "done": done, "now": torch.get_num_threads()}))
"""


def _apply(runtime: dict, world: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(runtime), str(world)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_threads_per_process_share_and_never_above_torchs_default_in_one_process() -> None:
    many = _apply({"threads": 64}, 1)  # one process: torch's own default (physical cores) is kept
    assert many["now"] == many["default"] == many["done"]["threads"]
    shared = _apply({"threads": 1}, 2)  # two processes on the cores: each takes its share
    assert shared["now"] == 1 == shared["done"]["threads"]
    assert "malloc" not in shared["done"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_allocator_setting_is_accepted_by_glibc() -> None:
    assert _apply({"malloc": "keep-freed"}, 1)["done"] == {"malloc": True}


def test_unknown_or_missing_settings_change_nothing() -> None:
    r = _apply({"malloc": "other", "threads": "many"}, 1)
    assert r["done"] == {} and r["now"] == r["default"]
