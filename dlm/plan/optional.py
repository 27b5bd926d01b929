"""Knobs that rest on an optional package: `report_to: tensorboard` and the `galore_*` optimizers. Pure.

Each needs a package that is an extra of dlm's (`pip install 'dlm[tensorboard]'`, `'dlm[galore]'`;
`make setup` installs both). The machine's probe lists what is missing (`HardwareFacts.missing_packages`,
found without importing anything) and `findings.py` blocks a plan whose knob needs one of them, before
any weights load. The decisions these knobs take live here:

- `galore_rank`: GaLore projects each gradient matrix onto its top `rank` singular directions. With an
  adapter, the matrices it sees are lora_A (r x in) and lora_B (out x r), whose smaller side is
  `lora_r`: a rank of `lora_r` or more keeps the whole gradient (a rotation, no memory saved) while the
  SVD still runs every `galore_update_proj_gap` steps. `auto` takes half of `lora_r`.
- `report_to`: dlm writes the tracker's log itself (`dlm/train/logs.py`), into `runs/rNNNN/logs/`,
  which is kept after the run; transformers' own callback would write under `checkpoints/`, which is
  pruned once the version is committed. So `trl.SFTConfig` gets `report_to="none"` and the tracker
  travels in `runtime_kwargs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dlm.doc.schema import Training

Decide = Callable[[str, Any, str], Any]

# What to install for each optional package: the extra, and the exact pin of constraints.txt.
INSTALL = {
    "tensorboard": "pip install 'dlm[tensorboard]' (or pip install tensorboard==2.21.0, the version dlm is tested with)",
    "galore-torch": "pip install 'dlm[galore]' (or pip install galore-torch==1.0, the version dlm is tested with)",
}
LOGS_DIR = "logs"  # runs/rNNNN/logs/: beside checkpoints/, never pruned


def needs(t: Training) -> tuple[str, ...]:
    """The optional packages the spec's knobs need."""
    return (
        *(("tensorboard",) if t.report_to == "tensorboard" else ()),
        *(("galore-torch",) if t.optimizer.startswith("galore") else ()),
    )


def auto_galore_rank(lora_r: int) -> int:
    """Half the adapter's rank (at least 1): the largest round share of it that still projects."""
    return max(1, lora_r // 2)


def decide_galore_rank(t: Training, decide: Decide) -> Training:
    """The knobs with `galore_rank` resolved to a number; a decision only when a GaLore optimizer runs."""
    rank = auto_galore_rank(t.lora_r) if t.galore_rank == "auto" else t.galore_rank
    if t.optimizer.startswith("galore"):
        sides = f"lora_A ({t.lora_r} x in) and lora_B (out x {t.lora_r})"
        if t.galore_rank == "auto":
            why = (
                f"auto: half of lora_r {t.lora_r} (at least 1): GaLore projects the gradients of {sides}, whose "
                "smaller side is lora_r, so a rank of lora_r or more would keep them whole and save nothing"
            )
        elif rank >= t.lora_r:
            why = f"spec: at or above lora_r {t.lora_r}, the smaller side of {sides}: nothing is projected"
        else:
            why = f"spec: projects the gradients of {sides} onto {rank} of their {t.lora_r} directions"
        decide("galore_rank", rank, why)
    return t.model_copy(update={"galore_rank": rank})


def decide_report_to(t: Training, decide: Decide) -> dict[str, Any]:
    """The tracker as a runtime setting (`train.logs` writes it), and a decision when there is one."""
    if t.report_to == "none":
        return {}
    decide(
        "report_to",
        t.report_to,
        f"spec: dlm writes TensorBoard event files to runs/rNNNN/{LOGS_DIR}/ (kept after the run, unlike "
        "checkpoints/): the plan, loss, learning rate, grad norm, tokens/s, eval losses and the learning "
        "report; `tensorboard --logdir <store>/runs` shows every run",
    )
    return {"report_to": t.report_to}
