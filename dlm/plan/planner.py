"""make_plan(spec, hardware, base, corpus) -> Plan: every knob decided, with its reason. Pure.

No I/O, no clock, no torch: the same values always give the same plan, so every machine is a JSON
fixture in the tests. `make_plan` takes the decisions in groups, one function each, in the order the
plan lists them. Beside it: the batch shape in `batch.py`; memory and time in `estimates.py` (the
formulas and their sources in docs/estimates.md); the plain kwargs in `kwargs.py` (only `dlm.train`
turns them into `LoraConfig`, `SFTConfig` and `from_pretrained` arguments); the judgements in
`findings.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from dlm.doc.schema import Spec, Training
from dlm.plan.bases import BaseFacts
from dlm.plan.batch import Batch, size_batch
from dlm.plan.budget import learning_epochs
from dlm.plan.corpus import CorpusStats
from dlm.plan.dora import decide_forward
from dlm.plan.estimates import (
    Estimates,
    MemoryModel,
    StepTime,
    adapter_shape,
    dpo_step_seconds,
    estimate,
    matches_a_layer,
    step_time,
)
from dlm.plan.findings import Derived, Finding, Level, Purpose, collect, reason_line
from dlm.plan.hardware import HardwareFacts
from dlm.plan.kwargs import dpo_kwargs, lora_kwargs, model_kwargs, sft_extras, sft_kwargs
from dlm.plan.optional import decide_galore_rank, decide_report_to

__all__ = ["Decision", "Finding", "Level", "Plan", "Purpose", "make_plan"]

MALLOC_MMAP = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
SEQ_MULTIPLE = 64  # sequence_len from the corpus is rounded up to this (and is at least this)
Decide = Callable[[str, Any, str], Any]  # records a Decision(key, value, reason) and returns the value


@dataclass(frozen=True)
class Decision:
    key: str
    value: Any
    reason: str


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    lora_kwargs: dict[str, Any]  # -> peft.LoraConfig(**lora_kwargs)
    sft_kwargs: dict[str, Any]  # -> trl.SFTConfig(output_dir=..., **sft_kwargs)
    model_kwargs: dict[str, Any]  # dtype (str), attn_implementation, quantization (BitsAndBytesConfig kwargs or None)
    findings: tuple[Finding, ...]
    estimates: Estimates
    reason: str
    world_size: int = 1
    # Settings train.py applies itself (no library takes them as kwargs): {"dora_dropout": "branch",
    # "dora_norm": "factored"} puts PEFT's DoRA layers on dlm's training forward (dlm/train/dora_fast.py,
    # after its guards) when the dora_forward decision is dlm;
    # {"report_to": "tensorboard"}: dlm writes the run's TensorBoard log itself (dlm/train/logs.py).
    runtime_kwargs: dict[str, Any] = field(default_factory=dict)
    sharding: str = "none"  # none (one process or DDP) | fsdp | zero0..zero3 (DeepSpeed), from the launcher
    # The phases of one `dlm train`, in order: ("sft",), ("dpo",) or ("sft", "dpo") (objective: dpo with
    # both kinds of examples); `dpo_kwargs` -> trl.DPOConfig(output_dir=..., **dpo_kwargs) for the DPO
    # phase, `reference` the model its loss compares against (base | sft).
    phases: tuple[str, ...] = ("sft",)
    dpo_kwargs: dict[str, Any] = field(default_factory=dict)
    reference: str = ""

    @property
    def blocked(self) -> bool:
        return any(f.level == "block" for f in self.findings)

    def decision(self, key: str) -> Any:
        return next(d.value for d in self.decisions if d.key == key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Kind:
    """Precision, attention and the adapter's kind: what every later group reads."""

    precision: str
    attn: str
    qlora: bool
    dora: bool
    dora_fast: bool = False  # dlm's DoRA training forward (dlm/plan/dora.py), not PEFT's


def make_plan(
    spec: Spec,
    hardware: HardwareFacts,
    base: BaseFacts,
    corpus: CorpusStats,
    *,
    world_size: int = 1,
    purpose: Purpose = "train",
    sharding: str = "none",
) -> Plan:
    """Decide every knob for `spec` on `hardware`; see docs/doctor.md for each decision and finding."""
    hw, t, given = hardware, spec.training, spec.training.model_fields_set
    world = max(1, world_size)
    decisions: list[Decision] = []

    def decide(key: str, value: Any, reason: str) -> Any:
        decisions.append(Decision(key, value, reason))
        return value

    phases, reference = _decide_objective(t, corpus, decide)
    kind = _decide_kind(t, hw, given, decide)
    targets, missing = _decide_targets(t, base, decide)
    seq = _decide_sequence_len(t, base, corpus, given, decide)
    memory = _memory_model(t, hw, base, corpus, kind, targets, seq, pairs="dpo" in phases)
    batch = size_batch(t, hw, corpus, seq, memory, world)
    _decide_batch(batch, world, sharding, decide)
    optim = _decide_optimizer(t, hw, given, decide)
    t = decide_galore_rank(t, decide)  # auto -> a number; recorded for GaLore optimizers
    row_tokens = _decide_packing(t, corpus, seq, batch.micro, given, decide)
    step = step_time(hw, base, spec, kind.precision, memory.adapter, batch.micro, batch.accum, row_tokens, batch.ckpt)
    step_s = step.seconds
    sft_rows = corpus.n_train - corpus.n_preference if "dpo" in phases else batch.n_rows  # triples go to DPO
    t, steps = _decide_steps(t, dataclasses.replace(batch, n_rows=max(1, sft_rows)), world, step_s, given, decide)
    estimates = estimate(memory, batch.micro, batch.accum, batch.ckpt, world, steps, step_s, row_tokens)
    if "dpo" in phases:
        estimates = _dpo_estimates(t, corpus, batch, world, step, memory, phases, estimates, decide)
        steps = estimates.optimizer_steps if phases == ("dpo",) else steps
    eval_steps, save_steps = _decide_eval_and_save(t, corpus, steps, step_s, decide)
    dpo_steps = next((d.value for d in decisions if d.key == "dpo_steps"), 0)  # 0 without a DPO phase

    lora = lora_kwargs(t, targets, kind.dora)
    sft = {
        **sft_kwargs(t, hw, kind.precision, batch, seq, optim, eval_steps, save_steps),
        **sft_extras(t, targets, world, sharding),
    }
    model = model_kwargs(kind.precision, kind.attn, kind.qlora, sharding, decide)
    derived = Derived(
        precision=kind.precision,
        micro_batch_size=batch.micro,
        grad_accum=batch.accum,
        world_size=world,
        optimizer_steps=steps,
        peak_memory_bytes=estimates.peak_memory_bytes,
        memory_budget_bytes=estimates.memory_budget_bytes,
        missing_targets=missing,
        checkpointing=batch.ckpt,
        purpose=purpose,
        sharding=sharding,
        sequence_len=seq,
        galore_rank=int(t.galore_rank),  # decided above: never 'auto' here
        phases=phases,
        dpo_steps=dpo_steps,
    )
    findings = collect(spec, hw, base, corpus, derived)
    runtime = {**_runtime_kwargs(t, hw, kind.dora_fast, world, decide), **decide_report_to(t, decide)}
    reason = _reason(t, kind, optim, findings, phases, reference)
    dpo = dpo_kwargs(sft, t.preference) if "dpo" in phases else {}
    if "sft" in phases and dpo:  # the DPO phase's own evaluation and checkpoint cadence, as the SFT phase's
        dpo_s = next(d.value for d in decisions if d.key == "dpo_step_seconds")
        dpo["save_steps"] = t.save_steps or max(1, min(math.ceil(dpo_steps / 4), math.ceil(600 / dpo_s)))
        dpo["eval_strategy"], dpo["eval_steps"] = "steps", t.eval_steps or max(1, math.ceil(dpo_steps / 4))
    return Plan(
        tuple(decisions),
        lora,
        sft,
        model,
        findings,
        estimates,
        reason,
        world,
        runtime,
        sharding,
        phases,
        dpo,
        reference,
    )


# --- the groups of decisions, in the order make_plan takes them ------------------------------------


def _decide_objective(t: Training, corpus: CorpusStats, decide: Decide) -> tuple[tuple[str, ...], str]:
    """The phases of the run and DPO's reference (docs/preference.md)."""
    n_pref, n_other = corpus.n_preference, corpus.n_train - corpus.n_preference - corpus.n_headings
    if t.objective != "dpo" or n_pref == 0:
        why = "objective sft: every example trains as a target" + (
            f" ({n_pref} preference triples on their chosen answer)" if n_pref else ""
        )
        return decide("phases", ("sft",), why), ""
    if n_other:
        phases = decide(
            "phases",
            ("sft", "dpo"),
            f"objective dpo: SFT on the {n_other} other examples, then DPO on the {n_pref} triples, "
            "on the SFT adapter, in one run",
        )
    else:
        phases = decide("phases", ("dpo",), f"objective dpo: DPO only, on the {n_pref} preference triples")
    written = t.preference.reference
    ref = written or ("sft" if n_other else "base")
    why = "from the spec" if written else ("unset: the SFT phase's adapter" if n_other else "unset: no SFT phase")
    ref = decide(
        "reference",
        ref,
        f"{why}; {'the base with the adapter switched off' if ref == 'base' else 'a frozen copy of the SFT adapter'}, "
        "never a second copy of the model",
    )
    return phases, ref


def _dpo_estimates(
    t: Training,
    corpus: CorpusStats,
    b: Batch,
    world: int,
    sft_step: StepTime,
    memory: MemoryModel,
    phases: tuple[str, ...],
    est: Estimates,
    decide: Decide,
) -> Estimates:
    """The DPO phase's steps and seconds; a run with an SFT phase adds them to its own."""
    p = t.preference
    per_epoch = max(1, math.ceil(math.ceil(corpus.n_preference / (b.micro * world)) / b.accum))
    if t.max_steps:
        steps = decide("dpo_steps", t.max_steps, f"max_steps {t.max_steps} from the spec (each phase)")
    else:
        steps = decide(
            "dpo_steps",
            math.ceil(p.num_epochs * per_epoch),
            f"ceil(ceil({corpus.n_preference} triples / ({b.micro} x {world})) / {b.accum}) = {per_epoch} per "
            f"epoch x {p.num_epochs:g} epochs",
        )
    step_s = dpo_step_seconds(sft_step, memory.base, memory.adapter, t.adapter)
    decide("dpo_step_seconds", round(step_s, 3), "two sequences a row plus the reference forward (no gradient)")
    if phases == ("dpo",):
        return dataclasses.replace(
            est, optimizer_steps=steps, step_seconds=round(step_s, 3), total_seconds=round(steps * step_s, 1)
        )
    return dataclasses.replace(est, total_seconds=round(est.total_seconds + steps * step_s, 1))


def _decide_kind(t: Training, hw: HardwareFacts, given: set[str], decide: Decide) -> _Kind:
    """Precision, attention and the adapter (with DoRA's dropout placement and QLoRA's 4-bit base)."""
    precision = decide("precision", *_precision(t.precision, hw))
    attn = decide(
        "attention",
        "sdpa",
        "PyTorch's scaled_dot_product_attention: fused kernels on CUDA, CPU and MPS, "
        "no seq x seq score matrix kept; flash_attention_2 needs a package outside the stack",
    )
    qlora, dora = t.adapter == "qlora", t.adapter == "dora"
    decide(
        "adapter",
        t.adapter,
        ("spec" if "adapter" in given else "default")
        + f": use_dora={dora}"
        + (", base loaded in 4-bit nf4" if qlora else ""),
    )
    fast = False
    if dora:
        forward, forward_why = decide_forward(t, hw.peft_version, given)
        fast = forward == "dlm"
        decide(
            "dora_dropout",
            t.dora_dropout,
            _dora_dropout_why(t.dora_dropout, t.lora_dropout, "dora_dropout" in given, fast),
        )
        decide("dora_forward", forward, forward_why)
    decide(
        "qlora",
        "on" if qlora else "off",
        "adapter: qlora (nf4, double quantisation, compute in the chosen precision)"
        if qlora
        else f"adapter: {t.adapter}: the base loads in {precision}",
    )
    return _Kind(precision, attn, qlora, dora, fast)


def _decide_targets(t: Training, base: BaseFacts, decide: Decide) -> tuple[list[str], tuple[str, ...]]:
    """The adapted layers, and those the spec lists that match no layer of the base."""
    if t.target_modules == "auto":
        targets, why = list(base.attention_modules), f"auto: the attention projections of {base.model_type}"
    elif t.target_modules == "all-linear":
        targets, why = list(base.linear_modules), "all-linear: every linear layer of the decoder blocks"
    else:
        targets, why = list(t.target_modules), "listed in the spec (PEFT matches each as a module-name suffix)"
    missing = () if isinstance(t.target_modules, str) else tuple(m for m in targets if not matches_a_layer(base, m))
    decide("target_modules", targets, why)
    return targets, missing


def _decide_sequence_len(t: Training, base: BaseFacts, corpus: CorpusStats, given: set[str], decide: Decide) -> int:
    """Written: honoured, clipped to the base's context. Not written: never below the longest example,
    never above the context; packing keeps rows of the default length unless an example is longer."""
    ctx, longest = base.context_len, corpus.max_tokens
    if corpus.exact:  # no margin; 64 keeps the plan steady under small edits (a batch pads to its longest row)
        need, about = _round_up(longest), f"longest example {longest} tokens ({corpus.counted})"
    else:  # text denser than the estimate assumes (code, rare scripts) gets the margin
        need, about = _round_up(longest * 1.5), f"longest example ~{longest} tokens ({corpus.counted}) x1.5"
    if "sequence_len" in given:
        want, why = t.sequence_len, f"{t.sequence_len} from the spec; {about}"
    else:
        want = max(t.sequence_len, need) if t.packing else need
        why = f"default {t.sequence_len} for packed rows, or more for the corpus: " if t.packing else "the corpus: "
        why += f"{about} -> {need} (rounded up to a multiple of {SEQ_MULTIPLE})"
    if want > ctx:
        why += f", clipped to {base.name}'s context {ctx}"
    return decide("sequence_len", min(want, ctx), why)


def _memory_model(
    t: Training,
    hw: HardwareFacts,
    base: BaseFacts,
    corpus: CorpusStats,
    kind: _Kind,
    targets: list[str],
    seq: int,
    *,
    pairs: bool = False,
) -> MemoryModel:
    return MemoryModel(
        hw,
        base,
        t.optimizer,
        kind.precision,
        kind.qlora,
        adapter_shape(base, targets, t.lora_r, kind.dora, t.lora_dropout > 0),
        seq if t.packing else max(1, min(seq, corpus.max_tokens)),  # padded to the longest row in a batch
        pairs,
    )


def _decide_batch(b: Batch, world: int, sharding: str, decide: Decide) -> None:
    """Record the batch shape `size_batch` chose, and the processes it is split over."""
    decide("micro_batch_size", b.micro, b.micro_why)
    decide("grad_accum", b.accum, b.accum_why)
    decide("effective_batch", b.micro * b.accum * world, f"{b.micro} micro x {b.accum} accum x {world} process(es)")
    if world > 1 or sharding != "none":
        decide(
            "processes",
            f"{world} x {'ddp' if sharding == 'none' else sharding}",
            "from the launcher (WORLD_SIZE; accelerate's FSDP / DeepSpeed settings): every process trains a "
            "micro batch of its own, rank 0 alone writes the store (docs/scaling.md)",
        )
    decide("gradient_checkpointing", b.ckpt, b.ckpt_why)


def _decide_optimizer(t: Training, hw: HardwareFacts, given: set[str], decide: Decide) -> str:
    optim = t.optimizer
    if "optimizer" in given:
        optim_why = "spec" + (
            ": GaLore projects exactly the adapter's lora_A/lora_B layers" if optim.startswith("galore") else ""
        )
    elif hw.device == "cuda":
        optim, optim_why = (
            "adamw_torch_fused",
            (
                "auto: CUDA: torch's fused AdamW, one kernel for every parameter "
                "instead of a chain of foreach kernels; the same update"
            ),
        )
    else:
        optim_why = (
            f"default: adamw_torch (foreach); on a {hw.device} the update of an adapter's few "
            "parameters is a negligible share of a step"
        )
    return decide("optimizer", optim, optim_why)


def _decide_steps(
    t: Training, b: Batch, world: int, step_s: float, given: set[str], decide: Decide
) -> tuple[Training, int]:
    """The training budget: the spec's max_steps or num_epochs when it sets one; otherwise the planner's
    epochs (`learning_epochs`). Returns the training knobs with the chosen num_epochs, and the steps."""
    steps_per_epoch = max(1, math.ceil(math.ceil(b.n_rows / (b.micro * world)) / b.accum))
    per_epoch = f"ceil(ceil({b.n_rows} rows / ({b.micro} x {world})) / {b.accum}) = {steps_per_epoch} per epoch"
    if t.max_steps:
        return t, decide("steps", t.max_steps, f"max_steps {t.max_steps} from the spec")
    if "num_epochs" in given:
        steps = math.ceil(t.num_epochs * steps_per_epoch)
        return t, decide("steps", steps, f"{per_epoch} x {t.num_epochs:g} epochs from the spec")
    epochs, why = learning_epochs(steps_per_epoch, step_s)
    t = t.model_copy(update={"num_epochs": float(epochs)})
    decide("num_epochs", epochs, why)
    return t, decide("steps", epochs * steps_per_epoch, f"{per_epoch} x {epochs} epochs (the planner's budget)")


def _decide_packing(t: Training, corpus: CorpusStats, seq: int, micro: int, given: set[str], decide: Decide) -> float:
    """Packing as written; returns the tokens a row costs a step (a batch pads to its longest row)."""
    mean = corpus.mean_tokens
    longest = min(corpus.max_tokens, seq)
    row_tokens = seq if t.packing else max(1.0, min(seq, mean + (longest - mean) * (micro - 1) / (micro + 1)))
    padding = 0.0 if t.packing or micro == 1 else max(0.0, 1 - min(mean, row_tokens) / row_tokens)
    decide("packing", t.packing, _packing_why(t.packing, "packing" in given, padding))
    return row_tokens


def _decide_eval_and_save(
    t: Training, corpus: CorpusStats, steps: int, step_s: float, decide: Decide
) -> tuple[int | None, int]:
    has_eval = corpus.n_heldout > 0
    eval_steps = (t.eval_steps or max(1, math.ceil(steps / 4))) if has_eval else None
    decide(
        "eval_steps",
        eval_steps or "off",
        ("spec" if t.eval_steps else "auto: ~4 evaluations per run") if has_eval else "no held-out examples",
    )
    save_steps = t.save_steps or max(1, min(math.ceil(steps / 4), math.ceil(600 / step_s)))
    decide(
        "save_steps",
        save_steps,
        "spec"
        if t.save_steps
        else "auto: a checkpoint 4 times a run or every ~10 estimated minutes, whichever is more often",
    )
    return eval_steps, save_steps


def _runtime_kwargs(t: Training, hw: HardwareFacts, fast: bool, world: int, decide: Decide) -> dict[str, Any]:
    # fast: the dora_forward decision is dlm's forward (branch dropout, factored norm; dlm/plan/dora.py)
    runtime: dict[str, Any] = {"dora_dropout": "branch", "dora_norm": "factored"} if fast else {}
    if hw.device == "cpu":
        runtime.update(_cpu_runtime(hw, world, decide))
    return runtime


def _reason(
    t: Training, kind: _Kind, optim: str, findings: tuple[Finding, ...], phases: tuple[str, ...], ref: str
) -> str:
    head = {
        "precision": kind.precision,
        "attn": kind.attn,
        "qlora": "on" if kind.qlora else "off",
        "adapter": t.adapter,
        "optim": optim,
    }
    if "dpo" in phases:
        head["objective"] = f"{'sft+' if 'sft' in phases else ''}dpo(beta={t.preference.beta:g}, ref={ref})"
    return reason_line(head, findings)


# --- reasons and helpers --------------------------------------------------------------------------


def _precision(choice: str, hw: HardwareFacts) -> tuple[str, str]:
    cc = hw.compute_capability
    if choice != "auto":
        return choice, f"spec: {choice} (honoured; the findings check it against this {hw.device})"
    if hw.device == "cuda":
        where = f"compute capability {cc[0]}.{cc[1]}" if cc else "this GPU"
        if (cc >= (8, 0)) if cc else hw.native_bf16:
            return "bf16", f"auto: {where} >= 8.0 has bf16 tensor cores; bf16 keeps fp32's range, no loss scaling"
        return "fp16", (
            f"auto: {where} < 8.0 has no bf16 tensor cores (decided from the compute capability, not "
            "torch.cuda.is_bf16_supported()); fp16 autocast with loss scaling"
        )
    if hw.device == "mps":
        return "fp32", (
            "auto: on Apple GPUs fp16 autocast needs a gradient scaler and bf16 needs macOS 14 + torch "
            ">= 2.6 to run well; fp32 trains correctly everywhere (set fp16/bf16 to trade memory)"
        )
    if hw.native_bf16:
        return "bf16", f"auto: this CPU has native bf16 ({', '.join(hw.cpu_flags)}): a bf16 step ~1.4x faster than fp32"
    return "fp32", (
        "auto: no amx_bf16 / avx512_bf16 on this CPU: bf16 would be emulated (a step ~14x slower, "
        "96 vs 7 s measured), so fp32"
    )


def _round_up(tokens: float) -> int:
    return max(SEQ_MULTIPLE, math.ceil(tokens / SEQ_MULTIPLE) * SEQ_MULTIPLE)


def _dora_dropout_why(mode: str, dropout: float, given: bool, fast: bool) -> str:
    src = "spec" if given else "default"
    norm = (
        "; the row norm ||W + sBA|| from factors (||W||^2 cached, W A^T, A A^T) instead of building W + sBA "
        "each forward, once per optimizer step: DoRA/LoRA x1.06-1.08 under dlm's plan vs x1.11-1.29 with TRL's "
        "defaults (make bench); the adapter saved is a plain PEFT DoRA adapter"
    )
    if dropout == 0:
        return f"{src}: no dropout to place (PEFT already reuses the base output)" + (norm if fast else "")
    if mode == "branch" and fast:
        return (
            f"{src}: lora_dropout {dropout:g} on the low-rank branch only, base output reused (torchtune, mlx-lm): "
            "no second base matmul per adapted layer" + norm
        )
    if mode == "branch":
        return (
            f"{src}: branch, not applied: PEFT's own forward runs (see dora_forward), so dropout falls on DoRA's "
            "whole input and each adapted layer runs its base matmul a second time"
        )
    return (
        f"{src}: PEFT's form, dropout on DoRA's whole input: each adapted layer runs its base matmul a second "
        "time (DoRA/LoRA x1.25 vs x1.15 for branch, measured on a SmolLM2-shaped model)"
    )


def _packing_why(packing: bool, given: bool, padding: float) -> str:
    src = "spec" if given else "default"
    if packing:
        return (
            f"{src}: TRL's bfd packing, padding-free: rows share sequence_len bins, position_ids restart per row "
            "and sdpa masks block-diagonally, so rows never attend to each other (tests/test_train.py)"
        )
    return (
        f"{src}: each batch pads to its longest row (~{padding:.0%} of a step's row slots estimated as "
        "padding); packing: true removes that but did not raise tokens/s on a 2-core CPU (docs/performance.md)"
    )


def _cpu_runtime(hw: HardwareFacts, world: int, decide: Decide) -> dict[str, Any]:
    """The CPU settings train.py applies in its own process (dlm/cpu_runtime.py), each a decision."""
    threads = decide(
        "cpu_threads",
        max(1, hw.cores // world),
        (
            f"{hw.cores} core(s) for {world} process(es): torch's intra-op threads per process (in one process "
            "never more than torch's own default, which counts physical cores: hyper-threads slow its matmuls); "
            "torchrun would leave each process OMP_NUM_THREADS=1 and the other cores idle"
        ),
    )
    malloc = decide(
        "cpu_allocator",
        "keep-freed",
        (
            f"glibc malloc hands every freed block over its mmap threshold back to the kernel, so each step's "
            f"activations and logits fault in fresh zeroed pages: dlm raises the threshold to {MALLOC_MMAP >> 20} MiB "
            "and stops heap trimming (mallopt), so freed blocks are reused: x1.07 tokens/s for ~0.2 GiB more peak RSS "
            "on the bench document (docs/performance.md); Linux with glibc only, elsewhere nothing changes"
        ),
    )
    return {"threads": threads, "malloc": malloc}
