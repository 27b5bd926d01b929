"""The knob sweep behind dlm's learning defaults (docs/learning.md, "The knob sweep").

    .venv/bin/python bench/learn/sweep.py NAME '{"learning_rate": 1e-3, "num_epochs": 20}' [DOC]

One row: DOC (default bench/learn/facts-20.dlm) planned with these `training:` overrides, as if the
document had written them, trained by `dlm.train.run.run` in a temporary folder, then its learning
report. Prints one JSON line: the knobs, steps, seconds and the report's line. Run one process per
row; rows run side by side share the CPU, so compare their learning, not their times.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    from dlm.plan.hardware import probe_light
    from dlm.plan.prepare import prepare
    from dlm.train import basefolder
    from dlm.train import run as train

    name, overrides = argv[0], json.loads(argv[1])
    doc = argv[2] if len(argv) > 2 else str(HERE / "facts-20.dlm")
    home = Path(os.environ.get("DLM_HOME") or HERE.parents[1] / ".dlm-home")
    p = prepare(doc, probe_light(), training_overrides=overrides, home=home)
    base = basefolder.materialize(p.base, home)
    with tempfile.TemporaryDirectory(prefix=f"sweep-{name}-") as out:
        t0 = time.time()
        s = train.run(p.plan, p.train, p.heldout, base, Path(out), report=32, seed=p.spec.training.seed)
    learning = s.learning or {}
    row = {
        "name": name,
        "overrides": overrides,
        "steps": s.steps,
        "seconds": round(time.time() - t0),
        "train": learning.get("train"),
        "heldout": learning.get("heldout"),
        "heldout_loss": s.eval_loss,
        "line": learning.get("line"),
    }
    print(json.dumps(row), flush=True)
    return 0 if s.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
