"""make_plan(spec, hardware, base, corpus) -> Plan: every knob decided, with its reason. Pure.

No I/O, no clock, no torch: the same values always give the same plan, so every machine is a JSON
fixture in the tests. The plan carries plain kwargs; only `train.py` turns them into `LoraConfig`,
`SFTConfig` and `from_pretrained` arguments. The judgements (findings) live in `findings.py`; the
memory and time formulas below are documented, with their sources, in docs/estimates.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dlm.doc.schema import Spec
from dlm.plan.bases import BaseFacts
from dlm.plan.corpus import CorpusStats
from dlm.plan.findings import Derived, Finding, Level, collect, reason_line
from dlm.plan.hardware import HardwareFacts

__all__ = ["Decision", "Estimates", "Finding", "Level", "Plan", "make_plan", "memory_budget"]

Purpose = Literal["train", "prompt"]
GIB = 2**30
FIT = 0.85  # auto knobs keep the estimated peak under this share of the budget (estimates are +-25%)

# --- constants of the estimates (docs/estimates.md says where each comes from) --------------------
NF4_BYTES = 0.52  # 4-bit nf4 + double-quantised absmax (blocksize 64)
ACT_PER_HIDDEN, ACT_PER_INTER = 12, 4  # activation elements per token per layer: 12*h + 4*i
OVERHEAD = {"cpu": 1.2 * GIB, "mps": 1.2 * GIB, "cuda": 0.5 * GIB}  # process RSS / CUDA context
OPT_STATE_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "galore_adamw": 8,
    "galore_adamw_8bit": 2,
    "galore_adamw_layerwise": 8,
    "adafactor": 0.5,
}
CPU_FLOPS_PER_CORE = 28e9  # fp32, AVX-512: calibrated on SmolLM2-135M LoRA steps (STACK.md)
# A CPU with AMX (Sapphire Rapids and later) is a faster generation: calibrated on a 2-core Xeon with
# amx_bf16 (`dlm doctor --probe 8` of configs/corpus-lora.dlm: fp32 1.95 s, bf16 1.53 s per step)
CPU_AMX_FLOPS_PER_CORE, CPU_AMX_BF16 = 140e9, 1.4
CPU_NO_AVX512 = 0.6
CPU_NATIVE_BF16 = 1.5  # measured on a 2-core EPYC with avx512_bf16: a LoRA step 1.4x, matmuls 2.0x
CPU_EMULATED = 14.0  # measured: emulated bf16 96 s vs fp32 7 s per step
CPU_DROPOUT_TAX = 1.12  # measured: dropout 0.05 vs 0 on a CPU, 6.0 vs 5.3 and 3.1 vs 2.8 s/step
CKPT_TAX = {"cpu": 1.2, "cuda": 1.3, "mps": 1.3}  # measured ~1.17-1.2 on CPU; GPUs ~20-30%
QLORA_TAX = {"cpu": 1.7, "cuda": 1.35, "mps": 1.35}  # measured 6.2 vs 3.7 s on CPU; GPU assumed
MICRO_OVERHEAD = {"cpu": 0.2, "cuda": 0.03, "mps": 0.05}  # s per micro batch (dispatch, collation)
STEP_OVERHEAD = {"cpu": 0.05, "cuda": 0.01, "mps": 0.01}  # s per optimizer step
GPU_MFU = 0.35  # sustained share of the nominal dense peak
GPU_PEAK = {  # compute capability -> (16-bit tensor-core, fp32) dense FLOP/s of a typical card
    (6, 0): (21e12, 10.6e12),
    (7, 0): (125e12, 15.7e12),
    (7, 5): (65e12, 8.1e12),
    (8, 0): (312e12, 19.5e12),
    (8, 6): (125e12, 31e12),
    (8, 9): (121e12, 30e12),
    (9, 0): (989e12, 67e12),
    (10, 0): (2250e12, 80e12),
    (12, 0): (210e12, 105e12),
}
MPS_PEAK = 7e12  # an M2/M3 Pro-class GPU, fp32 ~= fp16
MALLOC_MMAP = 32 * 2**20  # glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
OUTSIDE_BLOCKS = ("lm_head", "embed_tokens")  # targetable modules outside the decoder blocks


@dataclass(frozen=True)
class Decision:
    key: str
    value: Any
    reason: str


@dataclass(frozen=True)
class Estimates:
    optimizer_steps: int
    tokens_per_step: int
    peak_memory_bytes: int
    step_seconds: float
    total_seconds: float
    # weights, adapter, optimizer, activations, logits, overhead (docs/estimates.md)
    memory_breakdown: dict[str, int] = field(default_factory=dict)
    measured: bool = False  # True once `doctor --probe` replaced the estimates
    memory_budget_bytes: int = 0


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
    # "dora_norm": "factored"} puts PEFT's DoRA layers on dlm's training forward (dlm/dora_fast.py).
    runtime_kwargs: dict[str, Any] = field(default_factory=dict)
    sharding: str = "none"  # none (one process or DDP) | fsdp | zero0..zero3 (DeepSpeed), from the launcher

    @property
    def blocked(self) -> bool:
        return any(f.level == "block" for f in self.findings)

    def decision(self, key: str) -> Any:
        return next(d.value for d in self.decisions if d.key == key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Adapter:
    params: int  # trainable parameters (A, B and DoRA's magnitude vectors)
    adapted: int  # weights of the base layers the adapter wraps (DoRA recomputes their matmul)
    extra: int  # extra activation elements per token per layer


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _shapes(base: BaseFacts) -> dict[str, tuple[int, int]]:
    h, i, v = base.hidden_size, base.intermediate_size, base.vocab_size
    hd = h // base.n_heads
    q, kv = base.n_heads * hd, base.n_kv_heads * hd
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
        "lm_head": (h, v),
        "embed_tokens": (v, h),
    }


def _adapter(base: BaseFacts, targets: list[str], r: int, dora: bool, dropout: bool) -> _Adapter:
    shapes, h = _shapes(base), base.hidden_size
    params = adapted = extra = 0
    for name in targets:
        leaf = _leaf(name)
        if leaf not in base.linear_modules and leaf not in OUTSIDE_BLOCKS:
            continue  # matches nothing: target-module-missing
        times = 1 if leaf in OUTSIDE_BLOCKS else base.n_layers
        fin, fout = shapes.get(leaf, (h, h))
        params += times * (r * (fin + fout) + (fout if dora else 0))
        adapted += times * fin * fout
        if times > 1:
            extra += r + (fin if dropout else 0) + (fout if dora else 0)
    return _Adapter(params, adapted, extra)


def _block_linear(base: BaseFacts) -> int:
    shapes, h = _shapes(base), base.hidden_size
    per_layer = sum(a * b for a, b in (shapes.get(m, (h, h)) for m in base.linear_modules))
    return min(base.n_layers * per_layer, base.n_params)


def memory_budget(hw: HardwareFacts) -> int:
    """Bytes a run may use: a GPU's memory; system RAM minus max(2 GiB, 10%); 75% of unified memory."""
    if hw.device == "cuda":
        return hw.memory_bytes
    if hw.device == "mps":
        return int(hw.memory_bytes * 0.75)
    return hw.memory_bytes - max(2 * GIB, hw.memory_bytes // 10)


def _memory(
    hw: HardwareFacts,
    base: BaseFacts,
    optimizer: str,
    precision: str,
    qlora: bool,
    ad: _Adapter,
    tokens: int,
    ckpt: bool,
) -> dict[str, int]:
    wb = 4 if precision == "fp32" else 2
    if qlora:  # prepare_model_for_kbit_training upcasts everything not 4-bit to fp32
        lin = _block_linear(base)
        weights = lin * NF4_BYTES + (base.n_params - lin) * 4
    else:
        weights = base.n_params * wb
    per_layer = ACT_PER_HIDDEN * base.hidden_size + ACT_PER_INTER * base.intermediate_size + ad.extra
    kept = base.n_layers * base.hidden_size + per_layer if ckpt else base.n_layers * per_layer
    return {
        "weights": int(weights),
        "adapter": ad.params * 8,  # fp32 parameters + gradients
        "optimizer": int(ad.params * OPT_STATE_BYTES[optimizer]),
        "activations": tokens * kept * wb,
        "logits": tokens * base.vocab_size * (wb + 8),  # logits, their fp32 upcast for the loss, its gradient
        "overhead": int(OVERHEAD[hw.device]),
    }


def _flops_rate(hw: HardwareFacts, precision: str) -> float:
    if hw.device == "cpu":
        if "amx_bf16" in hw.cpu_flags:
            rate, bf16 = CPU_AMX_FLOPS_PER_CORE * hw.cores, CPU_AMX_BF16
        else:
            rate = CPU_FLOPS_PER_CORE * hw.cores * (1.0 if "avx512f" in hw.cpu_flags else CPU_NO_AVX512)
            bf16 = CPU_NATIVE_BF16
        if precision == "bf16" and hw.native_bf16:
            return rate * bf16
        return rate if precision == "fp32" else rate / CPU_EMULATED
    if hw.device == "mps":
        return MPS_PEAK * GPU_MFU
    cc = hw.compute_capability or (7, 0)
    half, single = GPU_PEAK[max((k for k in GPU_PEAK if k <= cc), default=(6, 0))]
    fast = precision == "fp16" or (precision == "bf16" and cc >= (8, 0))
    return GPU_MFU * (half if fast else single)


def _step_seconds(
    hw: HardwareFacts,
    base: BaseFacts,
    spec: Spec,
    precision: str,
    ad: _Adapter,
    micro: int,
    accum: int,
    row_tokens: float,
    ckpt: bool,
) -> float:
    t = spec.training
    tokens = micro * accum * row_tokens  # per device
    n_eff = base.n_params - (0 if base.tie_embeddings else base.vocab_size * base.hidden_size)
    flops = 4 * n_eff * tokens + 6 * ad.params * tokens  # frozen base: forward + input gradients only
    if t.adapter == "dora":
        flops += accum * 6 * t.lora_r * ad.adapted  # weight norm of W + s*BA, every forward
        if t.lora_dropout > 0 and t.dora_dropout == "input":
            flops += 4 * ad.adapted * tokens  # PEFT's slow path: a second base matmul on the dropped input
    seconds = flops / _flops_rate(hw, precision)
    if t.lora_dropout > 0 and hw.device == "cpu":
        seconds *= CPU_DROPOUT_TAX
    if ckpt:
        seconds *= CKPT_TAX[hw.device]
    if t.adapter == "qlora":
        seconds *= QLORA_TAX[hw.device]
    return seconds + accum * MICRO_OVERHEAD[hw.device] + STEP_OVERHEAD[hw.device]


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


def _dora_dropout_why(mode: str, dropout: float, given: bool) -> str:
    src = "spec" if given else "default"
    norm = (
        "; the row norm ||W + sBA|| from factors (||W||^2 cached, W A^T, A A^T) instead of building W + sBA "
        "each forward, once per optimizer step: DoRA/LoRA x1.06-1.08 under dlm's plan vs x1.11-1.29 with TRL's "
        "defaults (make bench); the adapter saved is a plain PEFT DoRA adapter"
    )
    if dropout == 0:
        return f"{src}: no dropout to place (PEFT already reuses the base output)" + norm
    if mode == "branch":
        return (
            f"{src}: lora_dropout {dropout:g} on the low-rank branch only, base output reused (torchtune, mlx-lm): "
            "no second base matmul per adapted layer" + norm
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


def _cpu_runtime(hw: HardwareFacts, world: int, decide: Any) -> dict[str, Any]:
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


def _bounded_pow2(cap: int) -> list[int]:
    return sorted({cap} | {2**k for k in range(cap.bit_length()) if 2**k <= cap}, reverse=True)


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
    if dora:
        decide(
            "dora_dropout", t.dora_dropout, _dora_dropout_why(t.dora_dropout, t.lora_dropout, "dora_dropout" in given)
        )
    decide(
        "qlora",
        "on" if qlora else "off",
        "adapter: qlora (nf4, double quantisation, compute in the chosen precision)"
        if qlora
        else f"adapter: {t.adapter}: the base loads in {precision}",
    )

    if t.target_modules == "auto":
        targets, why = list(base.attention_modules), f"auto: the attention projections of {base.model_type}"
    elif t.target_modules == "all-linear":
        targets, why = list(base.linear_modules), "all-linear: every linear layer of the decoder blocks"
    else:
        targets, why = list(t.target_modules), "listed in the spec (PEFT matches each as a module-name suffix)"
    missing = (
        ()
        if isinstance(t.target_modules, str)
        else tuple(m for m in targets if _leaf(m) not in base.linear_modules and _leaf(m) not in OUTSIDE_BLOCKS)
    )
    decide("target_modules", targets, why)

    # Sequence length: the base's context, and (unless the spec set it, or packing fills rows) what the
    # corpus needs: the longest example's estimated tokens x1.5, rounded up to 64.
    need = max(64, math.ceil(corpus.max_tokens * 1.5 / 64) * 64)
    seq = min(t.sequence_len, base.context_len)
    seq_why = f"{t.sequence_len} from the {'spec' if 'sequence_len' in given else 'default'}"
    if t.sequence_len > base.context_len:
        seq_why += f", clipped to {base.name}'s context {base.context_len}"
    if not t.packing and "sequence_len" not in given and need < seq:
        seq, seq_why = need, seq_why + f", clipped to the corpus: longest example ~{corpus.max_tokens} tokens x1.5"
    decide("sequence_len", seq, seq_why)
    mem_len = seq if t.packing else max(1, min(seq, corpus.max_tokens))  # padded to the longest row in a batch

    n_rows = max(1, math.ceil(corpus.train_tokens / seq)) if t.packing else max(1, corpus.n_train)
    target_eff = max(1, min(16 if n_rows >= 1024 else 8, n_rows))
    ad = _adapter(base, targets, t.lora_r, dora, t.lora_dropout > 0)
    budget = memory_budget(hw)

    def peak(m: int, ckpt: bool) -> int:
        return sum(_memory(hw, base, t.optimizer, precision, qlora, ad, m * mem_len, ckpt).values())

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
        if peak(m, c) <= FIT * budget
    ]
    micro, ckpt = fits[0] if fits else (cands[-1], t.gradient_checkpointing is not False)
    if isinstance(t.grad_accum, int) or layerwise:
        accum = accum_fixed or 1
    else:
        accum = max(1, min(math.ceil(target_eff / (micro * world)), n_rows // (micro * world)))

    if isinstance(t.micro_batch_size, int):
        m_why = "spec"
    else:
        m_why = (
            f"auto: largest of {cands} whose estimated peak ({peak(micro, ckpt) / GIB:.2f} GiB) stays under "
            f"{FIT:.0%} of the {budget / GIB:.1f} GiB budget"
            if fits
            else "auto: nothing fits; smallest"
        )
        if hw.device == "cpu":
            m_why += "; at most 4 on a CPU (padding to the longest row costs real compute there)"
    decide("micro_batch_size", micro, m_why)
    decide(
        "grad_accum",
        accum,
        "spec"
        if isinstance(t.grad_accum, int)
        else (
            "galore_adamw_layerwise supports no accumulation"
            if layerwise
            else f"auto: effective batch {target_eff} rows (8, or 16 from 1024 rows; never more than the {n_rows} rows)"
        ),
    )
    decide("effective_batch", micro * accum * world, f"{micro} micro x {accum} accum x {world} process(es)")
    if world > 1 or sharding != "none":
        decide(
            "processes",
            f"{world} x {'ddp' if sharding == 'none' else sharding}",
            "from the launcher (WORLD_SIZE; accelerate's FSDP / DeepSpeed settings): every process trains a "
            "micro batch of its own, rank 0 alone writes the store (docs/scaling.md)",
        )
    no_ckpt = peak(micro, False)
    if t.gradient_checkpointing != "auto":
        ck_why = f"spec: {t.gradient_checkpointing}"
    elif ckpt:
        ck_why = (
            f"auto: without it the estimated peak ({no_ckpt / GIB:.2f} GiB) exceeds {FIT:.0%} of the "
            f"{budget / GIB:.1f} GiB budget; it costs ~20-30% of step time"
        )
    else:
        ck_why = (
            f"auto: estimated peak without it {no_ckpt / GIB:.2f} GiB = {no_ckpt / budget:.0%} of the "
            f"{budget / GIB:.1f} GiB budget; TRL's default-on would cost ~20% of step time for nothing "
            "(3.7 vs 3.1 s/step measured)"
        )
    decide("gradient_checkpointing", ckpt, ck_why)
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
    decide("optimizer", optim, optim_why)

    steps_per_epoch = max(1, math.ceil(math.ceil(n_rows / (micro * world)) / accum))
    steps = t.max_steps or math.ceil(t.num_epochs * steps_per_epoch)
    decide(
        "steps",
        steps,
        f"max_steps {t.max_steps} from the spec"
        if t.max_steps
        else f"ceil(ceil({n_rows} rows / ({micro} x {world})) / {accum}) = {steps_per_epoch} per epoch x "
        f"{t.num_epochs:g} epochs",
    )

    mean = corpus.mean_tokens
    longest = min(corpus.max_tokens, seq)
    row_tokens = seq if t.packing else max(1.0, min(seq, mean + (longest - mean) * (micro - 1) / (micro + 1)))
    padding = 0.0 if t.packing or micro == 1 else max(0.0, 1 - min(mean, row_tokens) / row_tokens)
    decide("packing", t.packing, _packing_why(t.packing, "packing" in given, padding))
    step_s = _step_seconds(hw, base, spec, precision, ad, micro, accum, row_tokens, ckpt)
    breakdown = _memory(hw, base, t.optimizer, precision, qlora, ad, micro * mem_len, ckpt)
    estimates = Estimates(
        optimizer_steps=steps,
        tokens_per_step=round(row_tokens * micro * accum * world),
        peak_memory_bytes=sum(breakdown.values()),
        step_seconds=round(step_s, 3),
        total_seconds=round(steps * step_s, 1),
        memory_breakdown=breakdown,
        memory_budget_bytes=budget,
    )

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

    lora_kwargs = {
        "r": t.lora_r,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": t.lora_dropout,
        "target_modules": targets,
        "use_dora": dora,
        "use_rslora": t.use_rslora,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    sft: dict[str, Any] = {
        "per_device_train_batch_size": micro,
        "per_device_eval_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": float(t.num_epochs),
        "max_steps": t.max_steps or -1,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": float(t.warmup_ratio),
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": optim,
        "seed": t.seed,
        "data_seed": t.seed,
        "max_length": seq,
        "packing": t.packing,
        "completion_only_loss": True,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": hw.device == "cpu",
        "activation_checkpointing": ckpt,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if has_eval else "no",
        "save_strategy": "steps",
        "save_steps": save_steps,
        "report_to": t.report_to,
    }
    if eval_steps:
        sft["eval_steps"] = eval_steps
    if world > 1 and sharding == "none":
        # Every adapter weight takes part in every forward, so DDP's search for unused parameters (on
        # by default for a PEFT model) is an extra autograd traversal per step that finds nothing.
        sft["ddp_find_unused_parameters"] = False
    if t.optimizer.startswith("galore"):
        # A str is a full-match regex (a list would substring-match the lora.Linear wrappers too and log
        # "matched but ignored" for each): exactly PEFT's `<...>.<target>.lora_A.default` / `lora_B` layers.
        sft["optim_target_modules"] = rf".*\.(?:{'|'.join(re.escape(m) for m in targets)})\.lora_[AB]\.default"
        sft["optim_args"] = f"rank={t.galore_rank},update_proj_gap={t.galore_update_proj_gap},scale={t.galore_scale}"

    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    quant = (
        {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
        }
        if qlora
        else None
    )
    if quant and sharding in ("fsdp", "zero3"):
        # FSDP / ZeRO-3 flatten every parameter of a unit into one buffer of one dtype: the packed 4-bit
        # weights must be stored in the compute dtype, not uint8 (PEFT's FSDP-QLoRA and DeepSpeed guides).
        quant["bnb_4bit_quant_storage"] = decide(
            "bnb_4bit_quant_storage",
            dtype,
            f"{sharding} shards 4-bit weights with the rest only when they are "
            f"stored as {dtype} (uint8 storage fails to flatten)",
        )
    model_kwargs = {"dtype": dtype, "attn_implementation": attn, "quantization": quant}

    derived = Derived(
        precision, micro, accum, world, steps, estimates.peak_memory_bytes, budget, missing, ckpt, purpose, sharding
    )
    findings = collect(spec, hw, base, corpus, derived)
    head = {
        "precision": precision,
        "attn": attn,
        "qlora": "on" if qlora else "off",
        "adapter": t.adapter,
        "optim": optim,
    }
    # At lora_dropout 0 the two forms are the same function, so dlm's faster forward is used either way.
    fast = dora and (t.dora_dropout == "branch" or t.lora_dropout == 0)
    runtime: dict[str, Any] = {"dora_dropout": "branch", "dora_norm": "factored"} if fast else {}
    if hw.device == "cpu":
        runtime.update(_cpu_runtime(hw, world, decide))
    return Plan(
        tuple(decisions),
        lora_kwargs,
        sft,
        model_kwargs,
        findings,
        estimates,
        reason_line(head, findings),
        world,
        runtime,
        sharding,
    )
