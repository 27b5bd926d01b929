"""Two processes, three runs of one document, one launch: the two-process resume test's worker.

Run by tests/test_resume_checks.py as
`torchrun --standalone --nproc_per_node 2 tests/resumedriver.py DOC FULL_HOME CUT_HOME STOP OUT`.
Each rank runs `runs.train_document` (what `dlm train` runs, minus the console) three times: an
uninterrupted run into FULL_HOME; a run into CUT_HOME that rank 0 interrupts with SIGINT once step
STOP is logged (every rank then stops at the next step boundary, as under a Ctrl-C); and
`--resume` of that run. The heavy libraries and the process group are set up once for the three,
which saves two launches (~10 s of imports each). Rank 0 writes OUT (JSON): each run's status and
steps, and the files of the checkpoint the resume started from.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    doc, full_home, cut_home, stop, out = sys.argv[1:6]
    from dlm.train import device, runs

    hw = device.probe()
    rank = runs.rank()

    def interrupt(step: int, *_: object) -> None:
        if rank == 0 and step == int(stop):
            os.kill(os.getpid(), signal.SIGINT)

    full = runs.train_document(doc, Path(full_home), hw)
    cut = runs.train_document(doc, Path(cut_home), hw, on_step=interrupt)
    # Rank 0 writes the checkpoint's trainer_state.json (its completion mark) and records the run as
    # interrupted after the other ranks are done with the step: wait for it, as a new launch would.
    _barrier()
    checkpoint = Path(cut.summary.checkpoint) if cut.summary.checkpoint else None
    files = sorted(p.name for p in checkpoint.iterdir()) if rank == 0 and checkpoint else []
    resumed = runs.train_document(doc, Path(cut_home), hw, resume=True)
    if rank == 0:
        report = {
            name: {"status": o.summary.status, "steps": o.summary.steps, "version": o.version}
            for name, o in (("full", full), ("cut", cut), ("resumed", resumed))
        }
        report["checkpoint"] = {"path": str(checkpoint), "files": files}
        report["resumed_from"] = resumed.resumed_from
        Path(out).write_text(json.dumps(report, indent=2))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
