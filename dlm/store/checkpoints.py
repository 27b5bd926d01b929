"""Which Trainer checkpoint a `--resume` may start from: the newest complete `checkpoint-N`.

One rule for the store (`Store.latest_checkpoint`, which first picks the run) and for the trainer
(`train.run` with `resume_from=True`, given its own output folder).
"""

from __future__ import annotations

import json
from pathlib import Path


def latest_checkpoint(checkpoints_folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` folder in `checkpoints_folder` (by N), or None."""
    done = [
        (int(p.name[11:]), p)
        for p in Path(checkpoints_folder).glob("checkpoint-*")
        if p.name[11:].isdigit() and _complete_checkpoint(p)
    ]
    return max(done)[1] if done else None


def _complete_checkpoint(folder: Path) -> bool:
    """A Trainer checkpoint is whole once its `trainer_state.json` (written last) parses: a process
    killed while writing it leaves a truncated file, which must not be resumed from."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and isinstance(state.get("global_step"), int)
