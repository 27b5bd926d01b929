"""Estimates: a run's peak memory, its seconds per optimizer step and the memory budget it must fit. Pure.

`MemoryModel` is what peak memory depends on besides the batch shape (the planner sizes the batch
against it), `step_time` prices a step from its FLOPs and the device's rate, and `estimate` fills
the plan's `Estimates`. The formulas and every constant below are documented, with their sources,
in docs/estimates.md. No I/O, no clock, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlm.doc.schema import Spec
from dlm.plan.bases import BaseFacts
from dlm.plan.dora import decide_forward
from dlm.plan.hardware import HardwareFacts

GIB = 2**30

# --- constants of the estimates (docs/estimates.md says where each comes from) --------------------
NF4_BYTES = 0.52  # 4-bit nf4 + double-quantised absmax (blocksize 64)
# QLoRA's activations: measured on an H200 (SmolLM2-1.7B shape, micro 8 x 576 tokens, no checkpointing):
# peak 17.98 GiB against 14.78 estimated without this factor, and 15.61 for LoRA in bf16; the
# upcast stream outweighs the 4-bit weights' saving (docs/performance.md "GPU").
QLORA_ACT = 1.3
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
CPU_FLOPS_PER_CORE = 28e9  # fp32, AVX-512: calibrated on SmolLM2-135M LoRA steps (docs/estimates.md)
# A CPU with AMX (Sapphire Rapids and later) is a faster generation: calibrated on a 2-core Xeon with
# amx_bf16 (`dlm doctor --probe 8` of configs/corpus-lora.dlm: fp32 1.95 s, bf16 1.53 s per step)
CPU_AMX_FLOPS_PER_CORE, CPU_AMX_BF16 = 140e9, 1.4
# Without avx512f (AVX2 only): measured by `make learn` on a 2-core AMD EPYC (Zen 3, AVX2), fp32,
# micro 4 x accum 2, ~48-token rows, all-linear r=8: 3.3-3.7 s per step where 0.6 estimated 6.8 s;
# torch's AVX2 kernels keep pace with the AVX-512 calibration at this size (docs/estimates.md).
CPU_NO_AVX512 = 1.0
CPU_NATIVE_BF16 = 1.5  # measured on a 2-core EPYC with avx512_bf16: a LoRA step 1.4x, matmuls 2.0x
CPU_EMULATED = 14.0  # measured: emulated bf16 96 s vs fp32 7 s per step
CPU_DROPOUT_TAX = 1.12  # measured: dropout 0.05 vs 0 on a CPU, 6.0 vs 5.3 and 3.1 vs 2.8 s/step
CKPT_TAX = {"cpu": 1.2, "cuda": 1.3, "mps": 1.3}  # measured ~1.17-1.2 on CPU; GPUs ~20-30%
QLORA_TAX = {"cpu": 1.7, "cuda": 1.35, "mps": 1.35}  # measured 6.2 vs 3.7 s on CPU; GPU assumed
MICRO_OVERHEAD = {"cpu": 0.2, "cuda": 0.0, "mps": 0.05}  # s per micro batch (dispatch, collation)
# CUDA: a small model's step is bound by the host launching kernels, not by the GPU's FLOPs (the GPU
# waits on the CPU). Measured on an H200 (16-core host, torch 2.11, bf16, all-linear r=8, micro 8 x
# 576-token rows, `make bench`-style runs, docs/performance.md "GPU"): 10.9-11.7 ms per decoder layer
# per micro batch for LoRA and QLoRA, 14.6-15.0 for DoRA, at 135M and 1.7B alike. A step takes the
# longer of the two paths: FLOPs / rate, or layers x this per micro batch.
CUDA_LAUNCH_S_PER_LAYER = 0.0113
CUDA_DORA_LAUNCH = 1.32
# PEFT's DoRA forward at dropout > 0 launches a second base matmul and a dropout per DoRA layer:
# assumed +15% launches (not measured on a GPU; the H200 runs were at dropout 0).
CUDA_PEFT_DORA_SLOW = 1.15
# A DPO step's launches against an SFT step's (chosen and rejected in one batch, plus the reference
# forward): measured on an H200 (`bench/gpu.py run --runs dpo:...`, docs/gpu.md "DPO"), 135M and 1.7B:
# LoRA 1.01 and 0.96, DoRA 1.39 and 1.12, QLoRA 1.79 and 1.43 (QLoRA's reference forward dequantizes
# every 4-bit weight again). LoRA and QLoRA take the mean of each pair; DoRA's spread is the widest and
# 1.2 keeps both sizes within 15% (1.25, the mean, over-estimates the 1.7B step by 17%).
CUDA_DPO_LAUNCH = {"lora": 1.0, "dora": 1.2, "qlora": 1.6}
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
OUTSIDE_BLOCKS = ("lm_head", "embed_tokens")  # targetable modules outside the decoder blocks


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
class AdapterShape:
    params: int  # trainable parameters (A, B and DoRA's magnitude vectors)
    adapted: int  # weights of the base layers the adapter wraps (DoRA recomputes their matmul)
    extra: int  # extra activation elements per token per layer


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def matches_a_layer(base: BaseFacts, target: str) -> bool:
    """PEFT matches a target as a module-name suffix: does it name a linear layer of `base`?"""
    leaf = _leaf(target)
    return leaf in base.linear_modules or leaf in OUTSIDE_BLOCKS


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


def adapter_shape(base: BaseFacts, targets: list[str], r: int, dora: bool, dropout: bool) -> AdapterShape:
    shapes, h = _shapes(base), base.hidden_size
    params = adapted = extra = 0
    for name in targets:
        if not matches_a_layer(base, name):
            continue  # matches nothing: target-module-missing
        leaf = _leaf(name)
        times = 1 if leaf in OUTSIDE_BLOCKS else base.n_layers
        fin, fout = shapes.get(leaf, (h, h))
        params += times * (r * (fin + fout) + (fout if dora else 0))
        adapted += times * fin * fout
        if times > 1:
            extra += r + (fin if dropout else 0) + (fout if dora else 0)
    return AdapterShape(params, adapted, extra)


def _block_linear(base: BaseFacts) -> int:
    shapes, h = _shapes(base), base.hidden_size
    per_layer = sum(a * b for a, b in (shapes.get(m, (h, h)) for m in base.linear_modules))
    return min(base.n_layers * per_layer, base.n_params)


@dataclass(frozen=True)
class MemoryModel:
    """What a run's peak memory depends on besides its micro batch size and gradient checkpointing."""

    hw: HardwareFacts
    base: BaseFacts
    optimizer: str
    precision: str
    qlora: bool
    adapter: AdapterShape
    row_len: int  # tokens a row holds in memory: sequence_len when packing, else the longest row (padding)
    # DPO: every row is two sequences (chosen and rejected, one batch of 2 x micro), and a reference
    # forward (the adapter switched off, no gradient) runs while the policy's activations are held.
    pairs: bool = False

    @property
    def budget(self) -> int:
        return memory_budget(self.hw)

    def breakdown(self, micro: int, ckpt: bool) -> dict[str, int]:
        tokens = micro * self.row_len * (2 if self.pairs else 1)
        parts = memory_breakdown(
            self.hw, self.base, self.optimizer, self.precision, self.qlora, self.adapter, tokens, ckpt
        )
        if self.pairs:
            parts["reference"] = reference_forward_bytes(self.base, self.precision, tokens)
        return parts

    def peak(self, micro: int, ckpt: bool) -> int:
        return sum(self.breakdown(micro, ckpt).values())


def memory_budget(hw: HardwareFacts) -> int:
    """Bytes a run may use: a GPU's memory; system RAM minus max(2 GiB, 10%); 75% of unified memory."""
    if hw.device == "cuda":
        return hw.memory_bytes
    if hw.device == "mps":
        return int(hw.memory_bytes * 0.75)
    return hw.memory_bytes - max(2 * GIB, hw.memory_bytes // 10)


def memory_breakdown(
    hw: HardwareFacts,
    base: BaseFacts,
    optimizer: str,
    precision: str,
    qlora: bool,
    ad: AdapterShape,
    tokens: int,
    ckpt: bool,
) -> dict[str, int]:
    """Peak bytes by part: weights, adapter, optimizer, activations, logits, overhead."""
    wb = 4 if precision == "fp32" else 2
    if qlora:  # prepare_model_for_kbit_training upcasts everything not 4-bit to fp32
        lin = _block_linear(base)
        weights = lin * NF4_BYTES + (base.n_params - lin) * 4
    else:
        weights = base.n_params * wb
    per_layer = ACT_PER_HIDDEN * base.hidden_size + ACT_PER_INTER * base.intermediate_size + ad.extra
    kept = base.n_layers * base.hidden_size + per_layer if ckpt else base.n_layers * per_layer
    if qlora:  # the fp32 embedding and norms carry fp32 hidden states between the 4-bit layers
        kept = int(kept * QLORA_ACT)
    return {
        "weights": int(weights),
        "adapter": ad.params * 8,  # fp32 parameters + gradients
        "optimizer": int(ad.params * OPT_STATE_BYTES[optimizer]),
        "activations": tokens * kept * wb,
        "logits": tokens * base.vocab_size * (wb + 8),  # logits, their fp32 upcast for the loss, its gradient
        "overhead": int(OVERHEAD[hw.device]),
    }


def reference_forward_bytes(base: BaseFacts, precision: str, tokens: int) -> int:
    """DPO's reference forward under no_grad, on top of the policy's kept activations: it keeps no
    activations, so its peak is one layer's working set plus its logits and their fp32 log-softmax
    for the `tokens` of the batch (chosen and rejected). The same weights serve it (the adapter is
    switched off, or a second adapter is switched on): no second copy of the model."""
    wb = 4 if precision == "fp32" else 2
    layer = ACT_PER_HIDDEN * base.hidden_size + ACT_PER_INTER * base.intermediate_size
    return tokens * (layer * wb + base.vocab_size * (wb + 4))


def dpo_step_seconds(sft: StepTime, base: BaseFacts, ad: AdapterShape, adapter: str) -> float:
    """A DPO step from an SFT step of the same rows. Its FLOPs: twice the tokens (chosen and rejected)
    plus the reference forward, which costs 2 x n_eff FLOPs a token against training's 4 x n_eff + 6 x
    params. Its kernel launches (CUDA): chosen and rejected go through the model as one batch, so the
    policy launches what an SFT step launches; the reference forward adds what `CUDA_DPO_LAUNCH` says."""
    n_eff = base.n_params - (0 if base.tie_embeddings else base.vocab_size * base.hidden_size)
    train = 4 * n_eff + 6 * ad.params
    compute = 2 * sft.compute * (train + 2 * n_eff) / train
    return max(compute, sft.launch * CUDA_DPO_LAUNCH.get(adapter, 1.0)) + sft.overhead


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


@dataclass(frozen=True)
class StepTime:
    """An optimizer step's parts: the FLOPs path (compute / rate, with its taxes), the host's kernel
    launches (CUDA; 0 elsewhere), and the fixed overheads. The step takes max(compute, launch) + overhead."""

    compute: float
    launch: float
    overhead: float

    @property
    def seconds(self) -> float:
        return max(self.compute, self.launch) + self.overhead


def step_time(
    hw: HardwareFacts,
    base: BaseFacts,
    spec: Spec,
    precision: str,
    ad: AdapterShape,
    micro: int,
    accum: int,
    row_tokens: float,
    ckpt: bool,
) -> StepTime:
    """An optimizer step's time: FLOPs over the device's rate with its taxes, the CUDA host's launches,
    and the fixed overheads."""
    t = spec.training
    tokens = micro * accum * row_tokens  # per device
    n_eff = base.n_params - (0 if base.tie_embeddings else base.vocab_size * base.hidden_size)
    flops = 4 * n_eff * tokens + 6 * ad.params * tokens  # frozen base: forward + input gradients only
    slow_dora = t.adapter == "dora" and t.lora_dropout > 0 and decide_forward(t, hw.peft_version, set())[0] == "peft"
    if t.adapter == "dora":
        flops += accum * 6 * t.lora_r * ad.adapted  # weight norm of W + s*BA, every forward
        if slow_dora:
            flops += 4 * ad.adapted * tokens  # PEFT's slow path: a second base matmul on the dropped input
    seconds = flops / _flops_rate(hw, precision)
    if t.lora_dropout > 0 and hw.device == "cpu":
        seconds *= CPU_DROPOUT_TAX
    if ckpt:
        seconds *= CKPT_TAX[hw.device]
    if t.adapter == "qlora":
        seconds *= QLORA_TAX[hw.device]
    launch = 0.0
    if hw.device == "cuda":  # the host's kernel launches, overlapped with the GPU's work
        launch = accum * base.n_layers * CUDA_LAUNCH_S_PER_LAYER * (CUDA_DORA_LAUNCH if t.adapter == "dora" else 1.0)
        if slow_dora:
            launch *= CUDA_PEFT_DORA_SLOW
        launch *= CKPT_TAX["cuda"] if ckpt else 1.0
    return StepTime(seconds, launch, accum * MICRO_OVERHEAD[hw.device] + STEP_OVERHEAD[hw.device])


def estimate(
    memory: MemoryModel, micro: int, accum: int, ckpt: bool, world: int, steps: int, step_s: float, row_tokens: float
) -> Estimates:
    """The plan's estimates of a run with this batch shape, `steps` optimizer steps of `step_s` seconds each."""
    breakdown = memory.breakdown(micro, ckpt)
    return Estimates(
        optimizer_steps=steps,
        tokens_per_step=round(row_tokens * micro * accum * world),
        peak_memory_bytes=sum(breakdown.values()),
        step_seconds=round(step_s, 3),
        total_seconds=round(steps * step_s, 1),
        memory_breakdown=breakdown,
        memory_budget_bytes=memory.budget,
    )
