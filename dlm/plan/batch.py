"""The batch shape: micro batch size, gradient accumulation and gradient checkpointing, each with its reason. Pure.

What the spec sets is taken as written. On `auto`, the micro batch is the largest power of two (or
the cap itself) whose estimated peak memory stays under `FIT` of the budget, without checkpointing
if any fits that way; accumulation then reaches the target effective batch: 8 rows, or 16 from 1024
rows, never more than the rows there are. The memory estimate itself is `estimates.MemoryModel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dlm.doc.schema import Training
from dlm.plan.corpus import CorpusStats
from dlm.plan.estimates import GIB, MemoryModel
from dlm.plan.hardware import HardwareFacts

FIT = 0.85  # auto knobs keep the estimated peak under this share of the budget (estimates are +-25%)


@dataclass(frozen=True)
class Batch:
    n_rows: int  # rows per epoch: examples, or sequence_len bins when packing
    micro: int  # rows per device per step
    accum: int  # micro batches per optimizer step
    ckpt: bool  # gradient checkpointing
    micro_why: str
    accum_why: str
    ckpt_why: str


def size_batch(t: Training, hw: HardwareFacts, corpus: CorpusStats, seq: int, memory: MemoryModel, world: int) -> Batch:
    n_rows = max(1, math.ceil(corpus.train_tokens / seq)) if t.packing else max(1, corpus.n_train)
    target_eff = max(1, min(16 if n_rows >= 1024 else 8, n_rows))
    layerwise = t.optimizer == "galore_adamw_layerwise"
    accum_fixed = t.grad_accum if isinstance(t.grad_accum, int) else (1 if layerwise else None)
    if isinstance(t.micro_batch_size, int):
        cands = [t.micro_batch_size]
    else:
        cap = math.ceil(target_eff / (accum_fixed * world)) if accum_fixed else target_eff // world
        cap = max(1, min(cap, math.ceil(n_rows / world), 4 if hw.device == "cpu" else cap))
        cands = _bounded_pow2(cap)
    fits = [
        (m, c)
        for c in ((False, True) if t.gradient_checkpointing == "auto" else (t.gradient_checkpointing,))
        for m in cands
        if memory.peak(m, c) <= FIT * memory.budget
    ]
    micro, ckpt = fits[0] if fits else (cands[-1], t.gradient_checkpointing is not False)
    if isinstance(t.grad_accum, int) or layerwise:
        accum = accum_fixed or 1
    else:
        accum = max(1, min(math.ceil(target_eff / (micro * world)), n_rows // (micro * world)))
    return Batch(
        n_rows,
        micro,
        accum,
        ckpt,
        _micro_why(t, hw, memory, cands, bool(fits), micro, ckpt),
        _accum_why(t, target_eff, n_rows),
        _ckpt_why(t, memory, micro, ckpt),
    )


def _micro_why(
    t: Training, hw: HardwareFacts, memory: MemoryModel, cands: list[int], fits: bool, micro: int, ckpt: bool
) -> str:
    if isinstance(t.micro_batch_size, int):
        return "spec"
    why = (
        f"auto: largest of {cands} whose estimated peak ({memory.peak(micro, ckpt) / GIB:.2f} GiB) stays under "
        f"{FIT:.0%} of the {memory.budget / GIB:.1f} GiB budget"
        if fits
        else "auto: nothing fits; smallest"
    )
    if hw.device == "cpu":
        why += "; at most 4 on a CPU (padding to the longest row costs real compute there)"
    return why


def _accum_why(t: Training, target_eff: int, n_rows: int) -> str:
    if isinstance(t.grad_accum, int):
        return "spec"
    if t.optimizer == "galore_adamw_layerwise":
        return "galore_adamw_layerwise supports no accumulation"
    return f"auto: effective batch {target_eff} rows (8, or 16 from 1024 rows; never more than the {n_rows} rows)"


def _ckpt_why(t: Training, memory: MemoryModel, micro: int, ckpt: bool) -> str:
    no_ckpt, budget = memory.peak(micro, False), memory.budget
    if t.gradient_checkpointing != "auto":
        return f"spec: {t.gradient_checkpointing}"
    if ckpt:
        return (
            f"auto: without it the estimated peak ({no_ckpt / GIB:.2f} GiB) exceeds {FIT:.0%} of the "
            f"{budget / GIB:.1f} GiB budget; it costs ~20-30% of step time"
        )
    return (
        f"auto: estimated peak without it {no_ckpt / GIB:.2f} GiB = {no_ckpt / budget:.0%} of the "
        f"{budget / GIB:.1f} GiB budget; TRL's default-on would cost ~20% of step time for nothing "
        "(3.7 vs 3.1 s/step measured)"
    )


def _bounded_pow2(cap: int) -> list[int]:
    return sorted({cap} | {2**k for k in range(cap.bit_length()) if 2**k <= cap}, reverse=True)
