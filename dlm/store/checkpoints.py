"""Which Trainer checkpoint a `--resume` may start from: the newest complete `checkpoint-N`.

One rule for the store (`Store.latest_checkpoint`, which first picks the run) and for the trainer
(`train.run` with `resume_from=True`, given its own output folder). A two-phase run (SFT, then DPO;
docs/preference.md) checkpoints its SFT phase into `checkpoints/` and its DPO phase into
`checkpoints-dpo/`: a DPO checkpoint is further along than any SFT one, so it comes first, and it
resumes on the SFT phase's final checkpoint (`sft_final`), which the Trainer always saves at the
phase's last step.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINTS = "checkpoints"
DPO_CHECKPOINTS = "checkpoints-dpo"  # a two-phase run's DPO phase


def latest_checkpoint(checkpoints_folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in `checkpoints_folder` (by N), or None."""
    done = [
        (int(p.name[11:]), p)
        for p in Path(checkpoints_folder).glob("checkpoint-*")
        if p.name[11:].isdigit() and _complete_checkpoint(p)
    ]
    return max(done)[1] if done else None


def resume_point(run_dir: Path) -> Path | None:
    """A run's newest complete checkpoint: its DPO phase's (`checkpoints-dpo/`) before its SFT phase's."""
    return latest_checkpoint(Path(run_dir) / DPO_CHECKPOINTS) or latest_checkpoint(Path(run_dir) / CHECKPOINTS)


def is_dpo_checkpoint(checkpoint: Path) -> bool:
    """Is `checkpoint` one of a two-phase run's DPO phase (in `checkpoints-dpo/`)?"""
    return Path(checkpoint).parent.name == DPO_CHECKPOINTS


def sft_final(run_dir: Path) -> Path | None:
    """The SFT phase's final checkpoint of a two-phase run (the newest complete one in `checkpoints/`,
    when it is at the phase's last step and holds the adapter), or None."""
    found = latest_checkpoint(Path(run_dir) / CHECKPOINTS)
    if found is None or not (found / "adapter_model.safetensors").is_file():
        return None
    state = json.loads((found / "trainer_state.json").read_text("utf-8"))
    steps = state.get("max_steps")
    return found if isinstance(steps, int) and state["global_step"] >= steps > 0 else None


def _complete_checkpoint(folder: Path) -> bool:
    """A Trainer checkpoint is whole once its `trainer_state.json` (written last) parses: a process
    killed while writing it leaves a truncated file, which must not be resumed from."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)
