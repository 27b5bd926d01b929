"""The run's tracker log: `report_to: tensorboard` as TensorBoard event files in `runs/rNNNN/logs/`.

transformers' own `TensorBoardCallback` would write under the Trainer's `output_dir`, which for dlm
is `runs/rNNNN/checkpoints/`, pruned once the version is committed. dlm writes the log itself, into
a folder beside it that is kept (`dlm.plan.optional.LOGS_DIR`), from the same events `run` already
emits (`on_event`), so TensorBoard shows exactly what `log.jsonl` and the summary hold:

- `config/plan`, `config/reason` (text, at the start): the whole plan as JSON, and its reason line;
- `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/tokens`, `train/tokens_per_second`,
  `train/epoch` at each logged step, and `train/step_seconds` (each optimizer step's compute time);
- `eval/loss` and the Trainer's other `eval_*` figures at each periodic evaluation;
- `heldout/loss`, `heldout/base_loss`: the final held-out losses of the adapter and of the base;
- `learning/*`: the learning report's figures (answer F1 and exact matches, adapter and base; the
  held-out answers' F1; perplexities) and `learning/line` (text), at the last step.

`Tracker` is a context manager: entering opens the writer (torch's `SummaryWriter`, which needs the
`tensorboard` package; the planner blocks the run beforehand when it is missing), leaving closes it.
Only the process that writes the store writes the log (rank 0 under torchrun / accelerate).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from dlm.plan.optional import LOGS_DIR
from dlm.plan.planner import Plan
from dlm.train.loop import OnEvent

# log.jsonl's training-log keys -> TensorBoard scalar names
_TRAIN = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens": "train/tokens",
    "tokens_per_s": "train/tokens_per_second",
    "epoch": "train/epoch",
}
# the learning report's figures (LearningReport.to_json()) -> scalar names, as `dlm show` names them
_LEARNING = {
    ("train", "f1"): "learning/answer_f1",
    ("train", "base_f1"): "learning/base_answer_f1",
    ("train", "learned"): "learning/answers_learned",
    ("train", "base_learned"): "learning/base_answers_learned",
    ("train", "exact"): "learning/exact_matches",
    ("train", "base_exact"): "learning/base_exact_matches",
    ("train", "n"): "learning/answers_asked",
    ("heldout", "f1"): "learning/heldout_answer_f1",
    ("heldout", "base_f1"): "learning/base_heldout_answer_f1",
    ("heldout", "n"): "learning/heldout_answers_asked",
    ("heldout_perplexity",): "learning/heldout_perplexity",
    ("base_heldout_perplexity",): "learning/base_heldout_perplexity",
}


def logs_dir(out_dir: Path) -> Path:
    """Where a run's tracker log goes: `runs/rNNNN/logs/`."""
    return Path(out_dir) / LOGS_DIR


class Tracker:
    """Writes the run's events to TensorBoard; does nothing when the plan has no tracker."""

    def __init__(self, plan: Plan, folder: Path):
        self.plan = plan
        self.folder = Path(folder)
        rank = os.environ.get("RANK", "0") or "0"
        self.enabled = plan.runtime_kwargs.get("report_to") == "tensorboard" and rank == "0"
        self.writer: Any = None
        self.step = 0  # the latest optimizer step seen: where the end-of-run figures are written

    def __enter__(self) -> Tracker:
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(self.folder))
            plan_json = json.dumps(self.plan.to_json(), indent=2, default=str)
            self.writer.add_text("config/plan", f"```json\n{plan_json}\n```", 0)
            self.writer.add_text("config/reason", self.plan.reason, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def listen(self, emit: OnEvent) -> OnEvent:
        """`emit`, which also writes the events the log holds (when the writer is open)."""

        def both(kind: str, data: dict) -> None:
            if self.writer is not None:
                self._write(kind, data)
            emit(kind, data)

        return both

    def _write(self, kind: str, data: dict) -> None:
        if kind == "log":
            self.step = int(data.get("step", self.step))
            for key, value in data.items():
                name = _TRAIN.get(key) or (f"eval/{key[len('eval_') :]}" if key.startswith("eval_") else None)
                self._scalar(name, value)
            self.writer.flush()  # a killed run keeps every logged step
        elif kind == "step_time":
            self._scalar("train/step_seconds", data.get("seconds"), int(data.get("step", self.step)))
        elif kind == "eval":
            self._scalar("heldout/loss", data.get("eval_loss"))
            self._scalar("heldout/base_loss", data.get("base_eval_loss"))
            self.writer.flush()
        elif kind == "report" and isinstance(data.get("learning"), dict):
            report = data["learning"]
            for path, name in _LEARNING.items():
                found: Any = report
                for part in path:
                    found = found.get(part) if isinstance(found, dict) else None
                self._scalar(name, found)
            self.writer.add_text("learning/line", str(report.get("line", "")), self.step)
            self.writer.flush()

    def _scalar(self, name: str | None, value: Any, step: int | None = None) -> None:
        """One scalar; names that map to nothing, non-numbers and non-finite values are left out."""
        if name is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if math.isfinite(value):
            self.writer.add_scalar(name, value, self.step if step is None else step)
