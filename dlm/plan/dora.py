"""DoRA's training forward: dlm's faster one (dlm/train/dora_fast.py) or PEFT's own. Pure.

dlm's forward replaces one static method of PEFT's `DoraLinearVariant` on each layer and calls
PEFT's `DoraLinearLayer` internals, so it is only known to be right on the PEFT releases it was
tested against: `PEFT_RANGE`. The planner decides the forward from the spec (`dora_forward`,
`dora_dropout`, `lora_dropout`) and the installed PEFT's version (read from package metadata by the
hardware probe, never by importing PEFT); the run then checks dlm's forward against PEFT's on a small
layer before it trains (`dlm.train.dora_fast.switch_on`) and falls back to PEFT's if they differ.
docs/dora-dropout.md, "Guards", describes both checks.
"""

from __future__ import annotations

import re
from typing import Literal

from dlm.doc.schema import Training

Forward = Literal["dlm", "peft"]

# [low, high): the PEFT releases dlm's forward is tested against (constraints.txt pins 0.21.2). The upper
# bound is also pyproject's bound on peft (tests/test_dora_forward.py keeps the two in step).
PEFT_RANGE = ((0, 21), (0, 22))
PEFT_RANGE_TEXT = ">=0.21,<0.22"


def release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string such as "0.21.2" or "0.22.0.dev0"; None when unreadable."""
    found = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def peft_in_range(version: str | None) -> bool | None:
    """Whether dlm's forward is known to match this PEFT; None when the version is not known."""
    if version is None:
        return None
    rel = release(version)
    return rel is not None and PEFT_RANGE[0] <= rel < PEFT_RANGE[1]


def wants_dlm_forward(t: Training) -> bool:
    """The spec asks for dlm's forward: DoRA, `dora_forward: dlm`, and branch dropout or no dropout
    (at dropout 0 the two dropout placements are one function, so dlm's forward is used either way)."""
    return t.adapter == "dora" and t.dora_forward == "dlm" and (t.dora_dropout == "branch" or t.lora_dropout == 0)


def version_out_of_range(t: Training, peft_version: str | None) -> bool:
    """dlm's forward was asked for, but the installed PEFT is outside `PEFT_RANGE` (a warn finding)."""
    return wants_dlm_forward(t) and peft_in_range(peft_version) is False


def decide_forward(t: Training, peft_version: str | None, given: set[str] | frozenset[str]) -> tuple[Forward, str]:
    """(forward, reason) for a DoRA run. `peft_version` None: not known (a `--hardware` fixture without it)."""
    src = "spec" if "dora_forward" in given else "default"
    if t.dora_forward == "peft":
        ignored = (
            "; dora_dropout: branch is not applied (PEFT's form: dropout on DoRA's whole input)"
            if t.dora_dropout == "branch" and t.lora_dropout > 0
            else ""
        )
        return "peft", f"spec: PEFT's own DoRA forward, unchanged{ignored}"
    if not wants_dlm_forward(t):
        return "peft", (
            f"dora_dropout: input with lora_dropout {t.lora_dropout:g} is PEFT's form, so PEFT's own forward runs"
        )
    if peft_in_range(peft_version) is False:
        return "peft", (
            f"PEFT {peft_version} is outside {PEFT_RANGE_TEXT}, the releases dlm's forward is tested against: "
            "PEFT's own forward (warn dora-forward-peft-version)"
        )
    where = f"PEFT {peft_version} is within {PEFT_RANGE_TEXT}" if peft_version else "PEFT's version not known here"
    return "dlm", (
        f"{src}: dlm's forward (branch dropout, factored norm); {where}; before training it is checked "
        "against PEFT's forward on a small layer in the run's dtype (outputs and gradients), and the run "
        "falls back to PEFT's forward if they differ"
    )
