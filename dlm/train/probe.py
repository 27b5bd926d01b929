"""`dlm doctor FILE --probe N`: N real optimizer steps replace the plan's estimates with measurements.

The probe trains exactly what `dlm train` would (same hardware probe, same plan, same `train.run`),
for N steps, into a temporary folder that is deleted afterwards: nothing reaches the store. Evaluation
and checkpoints are switched off for the probe, so every second measured is a training step. The
plan's estimates become: steady seconds per step (the mean after 2 warm-up steps, stalls left out,
as the ETA of `dlm train` computes it), the projected total (the plan's optimizer steps x that), and
the process's peak memory (CUDA: max allocated; CPU: peak RSS, loading included). The estimates they
replace stay in `probe` for comparison.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from dlm.errors import RunError
from dlm.plan.doctor import Diagnosis
from dlm.plan.hardware import HardwareFacts
from dlm.train.progress import WARMUP_STEPS, EtaEstimator


def probe_file(path: Path, hardware: HardwareFacts, home: Path, steps: int, *, on_step: Any = None) -> Diagnosis:
    """Plan `path` as `dlm train` would, train `steps` steps in a temporary folder, return the measured plan."""
    from dlm.plan.prepare import prepare
    from dlm.train import basefolder
    from dlm.train import run as train

    # The base folder first, so the plan counts tokens with its tokenizer exactly as `dlm train` does.
    p = prepare(path, hardware, home=home, base_folder=lambda base: basefolder.materialize(base, home))
    if p.plan.blocked:
        codes = ", ".join(f.code for f in p.plan.findings if f.level == "block")
        raise RunError(
            f"the plan is blocked ({codes}); there is nothing to probe",
            f"`dlm doctor {path}` shows each finding and its fix",
            p.doc.path,
        )
    folder = basefolder.materialize(p.base, home)
    sft = {k: v for k, v in p.plan.sft_kwargs.items() if k != "eval_steps"}
    sft.update(eval_strategy="no", save_strategy="no")  # the probe measures steps, not pauses
    plan = dataclasses.replace(p.plan, sft_kwargs=sft)
    # The rate `dlm train`'s ETA would use: the mean step after the warm-up, stalls left out (steps differ
    # in length when batches pad to their longest row, so a median would misjudge the total).
    eta = EtaEstimator(steps, warmup_steps=WARMUP_STEPS)

    def on_event(kind: str, data: dict) -> None:
        if kind == "train_begin":
            eta.start(time.perf_counter(), data["step"])

    def step(n: int, total: int, loss: Any, tokens: int, elapsed: float) -> None:
        eta.step(n, time.perf_counter(), tokens)
        if on_step is not None:
            on_step(n, total, loss, tokens, elapsed)

    with tempfile.TemporaryDirectory(prefix="dlm-probe-") as tmp:
        summary = train.run(
            plan,
            p.train,
            (),
            folder,
            Path(tmp),
            trust_remote_code=p.spec.trust_remote_code,
            max_steps=steps,
            on_step=step,
            on_event=on_event,
            eval_base=False,
        )
    step_s = eta.seconds_per_step() or summary.steady_step_seconds
    if summary.status != "ok" or not step_s:
        raise RunError(
            f"the probe did not finish ({summary.status}): {summary.message}",
            "`dlm train` would fail the same way; check the findings",
            p.doc.path,
        )
    est = p.plan.estimates
    measured = dataclasses.replace(
        est,
        step_seconds=round(step_s, 3),
        total_seconds=round(est.optimizer_steps * step_s, 1),
        peak_memory_bytes=summary.peak_memory_bytes,
        measured=True,
    )
    probe = {
        "steps": summary.steps,
        "seconds": round(summary.seconds, 1),
        "steady_step_seconds": round(step_s, 3),
        "tokens_per_second": round(eta.tokens_per_second() or summary.tokens_seen / (summary.steps * step_s), 1),
        "peak_memory_bytes": summary.peak_memory_bytes,
        "estimated_step_seconds": est.step_seconds,
        "estimated_total_seconds": est.total_seconds,
        "estimated_peak_memory_bytes": est.peak_memory_bytes,
        "step_ratio": round(step_s / est.step_seconds, 3) if est.step_seconds else None,
        "memory_ratio": round(summary.peak_memory_bytes / est.peak_memory_bytes, 3) if est.peak_memory_bytes else None,
    }
    return Diagnosis(str(path), p.spec.dlm_id, p.base, p.corpus, dataclasses.replace(p.plan, estimates=measured), probe)
