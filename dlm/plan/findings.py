"""Findings: the planner's judgements about a spec on a machine, as data. Pure.

`collect` turns the spec, the machine, the base, the corpus and what `make_plan` derived into a
tuple of `Finding`s: each with a level, a stable code, a message, the fix and the numbers that
triggered it. The rules are a few functions, one per level and theme, each adding what it finds.
Thresholds and the figures behind them are documented in docs/doctor.md; a code, once shipped, never
changes its meaning.

Length (~450 lines, over the house's ~400): this is the one table of rules that docs/doctor.md
mirrors row for row; split across modules it would be read in pieces. Every function is short.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from dlm.doc.compat import ORIGINAL_VERSIONS, version_note
from dlm.doc.schema import Spec
from dlm.plan.bases import BaseFacts
from dlm.plan.corpus import MIN_HELDOUT_SHARE, CorpusStats
from dlm.plan.dora import PEFT_RANGE_TEXT, version_out_of_range
from dlm.plan.hardware import HardwareFacts
from dlm.plan.optional import INSTALL, auto_galore_rank

Level = Literal["info", "warn", "block"]
# What a plan is made for: a run (`train`), answering with a trained adapter (`prompt`: `dlm prompt`,
# `dlm chat`), or reading a store and scoring it (`inspect`: `dlm show`, `dlm compare`). Checked
# statically (mypy in `make lint`): a purpose outside this list fails the type check.
Purpose = Literal["train", "prompt", "inspect"]
# Findings about answering with the adapter: `dlm prompt` and `dlm chat` show them before the answers.
PROMPT_CODES = frozenset({"dora-unmerged-inference"})
_ORDER = {"block": 0, "warn": 1, "info": 2}

GALORE_MIN_PARAMS = 1_000_000_000  # GaLore's gains start at 7B; nothing below 1B saves anything
DEMO_MAX_PARAMS = 300_000_000
DORA_HIGH_RANK = 32
DORA_SHORT_RUN_STEPS = 500
FEW_STEPS = 20
LORA_LOW_LR = 2e-5  # TRL's full-fine-tune default; LoRA wants ~10x
DPO_LR_HIGH = 1e-4  # above this a DPO rate is SFT-sized (LoRA DPO recipes use 5e-6..5e-5); both rewards fall
DPO_FEW_PAIRS = 8  # fewer training triples than one default effective batch
DPO_BETA_LOW, DPO_BETA_HIGH = 0.01, 1.0  # outside: no pull toward the reference, or no room to move
GIB = 2**30
# `heldout-too-small`: `dlm compare` resolves its default --min-gain of 5% only when the half-width of
# its 95% bootstrap interval is under 5%. The interval's half-width is about 1.96 x s / sqrt(n), with s
# the standard deviation across held-out examples of the paired per-example gain (A's summed loss
# minus B's, over A's mean). EXAMPLE_SPREAD is a conservative assumed s, to be replaced by one measured
# on the shipped LoRA/DoRA twins (docs/compare.md, "How many held-out examples"); n >= (1.96 x s / 0.05)^2.
COMPARE_MIN_GAIN = 0.05  # the default of `dlm compare --min-gain` (a test keeps them equal)
EXAMPLE_SPREAD = 0.15
HELDOUT_FOR_MIN_GAIN = math.ceil((1.959964 * EXAMPLE_SPREAD / COMPARE_MIN_GAIN) ** 2)


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str
    hint: str
    evidence: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # short evidence for the reason line: `galore-small-base(135M<1B)`


@dataclass(frozen=True)
class Derived:
    """What make_plan decided that the findings read."""

    precision: str
    micro_batch_size: int
    grad_accum: int
    world_size: int
    optimizer_steps: int
    peak_memory_bytes: int
    memory_budget_bytes: int
    missing_targets: tuple[str, ...]
    checkpointing: bool = False
    purpose: Purpose = "train"
    sharding: str = "none"  # none | fsdp | zero0..zero3
    sequence_len: int = 0  # the decided max_length: longer examples are cut
    galore_rank: int = 0  # the decided GaLore projection rank (auto resolved; plan/optional.py)
    phases: tuple[str, ...] = ("sft",)  # the run's phases: sft, dpo, or both (objective: dpo)
    dpo_steps: int = 0  # a two-phase run's DPO steps (optimizer_steps are its SFT phase's)


Add = Callable[..., None]  # add(level, code, message, hint, tag="", **evidence) records one Finding


def collect(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived) -> tuple[Finding, ...]:
    out: list[Finding] = []

    def add(level: Level, code: str, message: str, hint: str, tag: str = "", **evidence: Any) -> None:
        out.append(Finding(level, code, message, hint, evidence, tag))

    for rules in _RULES:
        rules(spec, hw, base, corpus, d, add)
    return tuple(sorted(out, key=lambda f: _ORDER[f.level]))  # stable: rule order within a level


# --- blocks: the run would fail or do nothing ----------------------------------------------------


def _machine_blocks(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Blocks: the machine lacks what the spec needs (bitsandbytes, bf16 tensor cores)."""
    t = spec.training
    qlora = t.adapter == "qlora"
    cc = hw.compute_capability
    if qlora and not hw.bitsandbytes:
        add(
            "block",
            "qlora-needs-bitsandbytes",
            f"adapter qlora loads the base in 4-bit with bitsandbytes, which is not usable on this {hw.device}",
            "pip install bitsandbytes (CUDA, or CPU with bitsandbytes >= 0.45), or use adapter: lora",
            hw.device,
            device=hw.device,
            bitsandbytes=hw.bitsandbytes,
        )
    if t.optimizer.endswith("8bit") and not hw.bitsandbytes:
        add(
            "block",
            "optimizer-needs-bitsandbytes",
            f"optimizer {t.optimizer} keeps 8-bit states with bitsandbytes, which is not usable on this {hw.device}",
            "use optimizer: adamw_torch (an adapter's optimizer state is small anyway)",
            t.optimizer,
            optimizer=t.optimizer,
            device=hw.device,
            bitsandbytes=hw.bitsandbytes,
        )
    if d.precision == "bf16" and hw.device != "cpu":
        ok = cc >= (8, 0) if (hw.device == "cuda" and cc) else hw.native_bf16
        if not ok:
            where = f"cc{cc[0]}.{cc[1]}" if cc else hw.device
            add(
                "block",
                "bf16-unsupported",
                f"precision bf16 on {hw.name} ({where}): bf16 needs compute capability 8.0 (Ampere) or newer",
                "set precision: fp16 (or auto, which picks fp16 here)",
                where,
                compute_capability=list(cc) if cc else None,
                device=hw.device,
            )


def _package_blocks(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Blocks: a knob needs an optional package that is not installed (found by the probe, nothing imported)."""
    t = spec.training
    if t.report_to == "tensorboard" and "tensorboard" in hw.missing_packages:
        add(
            "block",
            "report-needs-tensorboard",
            "report_to: tensorboard writes the run's log with the tensorboard package, which is not installed "
            "here: the run would stop with an error after the base had loaded",
            f"{INSTALL['tensorboard']}, or report_to: none",
            "not-installed",
            report_to=t.report_to,
            missing=list(hw.missing_packages),
        )
    if t.optimizer.startswith("galore") and "galore-torch" in hw.missing_packages:
        add(
            "block",
            "galore-needs-galore-torch",
            f"optimizer {t.optimizer} runs GaLore from the galore-torch package, which is not installed here: "
            "transformers would raise an ImportError after the base had loaded",
            f"{INSTALL['galore-torch']}, or optimizer: adamw_torch",
            "not-installed",
            optimizer=t.optimizer,
            missing=list(hw.missing_packages),
        )


def _setup_blocks(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Blocks: knobs that cannot run together, or not on this many processes."""
    t = spec.training
    galore = t.optimizer.startswith("galore")
    if t.optimizer == "galore_adamw_layerwise" and (d.grad_accum > 1 or d.world_size > 1):
        tag = f"grad_accum={d.grad_accum}" if d.grad_accum > 1 else f"world_size={d.world_size}"
        add(
            "block",
            "galore-layerwise-accum",
            "galore_adamw_layerwise steps each layer inside backward: transformers refuses gradient "
            "accumulation and DDP with it, and it would save nothing there (transformers #29732)",
            "set grad_accum: 1 and train in one process, or use optimizer: galore_adamw",
            tag,
            grad_accum=d.grad_accum,
            world_size=d.world_size,
        )
    if galore and d.sharding != "none":
        add(
            "block",
            "galore-sharded",
            f"GaLore projects each weight's whole 2-D gradient, but {d.sharding} flattens and shards parameters "
            "across processes: GaLore does not run under FSDP or DeepSpeed ZeRO (GaLore #2, #23)",
            "train with plain DDP (torchrun / accelerate launch --multi_gpu), or use optimizer: adamw_torch",
            d.sharding,
            optimizer=t.optimizer,
            sharding=d.sharding,
        )
    if d.world_size > 1 and hw.device == "mps":
        add(
            "block",
            "multi-process-mps",
            f"{d.world_size} processes on Apple MPS: torch.distributed has no backend for MPS tensors",
            "train in one process on a Mac (plain `dlm train`)",
            f"world_size={d.world_size}",
            world_size=d.world_size,
            device=hw.device,
        )


def _fit_blocks(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Blocks: targets that match nothing, a peak that exceeds the budget."""
    qlora = spec.training.adapter == "qlora"
    if d.missing_targets:
        add(
            "block",
            "target-module-missing",
            f"target_modules {list(d.missing_targets)} match no linear layer of {base.name} "
            f"(its layers: {', '.join(base.linear_modules)}); the knob would silently do nothing",
            f"use names from {list(base.linear_modules)}, or target_modules: auto / all-linear",
            "+".join(d.missing_targets),
            missing=list(d.missing_targets),
            linear_modules=list(base.linear_modules),
        )
    if d.peak_memory_bytes > d.memory_budget_bytes:
        add(
            "block",
            "memory-over-budget",
            f"estimated peak memory {d.peak_memory_bytes / GIB:.1f} GiB exceeds this {hw.device}'s budget "
            f"of {d.memory_budget_bytes / GIB:.1f} GiB",
            "; ".join(
                [
                    *(["adapter: qlora"] if not qlora else []),
                    *(["micro_batch_size: 1"] if d.micro_batch_size > 1 else []),
                    *(["gradient_checkpointing: true"] if not d.checkpointing else []),
                    "a shorter sequence_len",
                    "or a smaller base",
                ]
            ),
            f"{d.peak_memory_bytes / GIB:.1f}GiB>{d.memory_budget_bytes / GIB:.1f}GiB",
            peak_memory_bytes=d.peak_memory_bytes,
            memory_budget_bytes=d.memory_budget_bytes,
            micro_batch_size=d.micro_batch_size,
        )


# --- warnings: it runs, but a knob works against you -------------------------------------------


def _speed_warnings(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Warnings: a knob that makes every step slower for nothing."""
    t = spec.training
    dora = t.adapter == "dora"
    galore = t.optimizer.startswith("galore")
    if galore and base.n_params < GALORE_MIN_PARAMS:
        add(
            "warn",
            "galore-small-base",
            f"GaLore on a {base.params_label} base: its gains start at 7B; small models save nothing and slow down "
            "(Pythia-160M 14.1 -> 23.6 s at the same 3.44 GB, litgpt #1192)",
            "use optimizer: adamw_torch",
            f"{base.params_label}<1B",
            n_params=base.n_params,
            threshold=GALORE_MIN_PARAMS,
        )
    if galore and d.galore_rank >= t.lora_r:
        r, auto = t.lora_r, auto_galore_rank(t.lora_r)
        add(
            "warn",
            "galore-rank-no-projection",
            f"galore_rank {d.galore_rank} >= lora_r {r}: the gradients GaLore projects (lora_A {r} x in, lora_B "
            f"out x {r}) have rank {r} at most, so the projection keeps them whole: no optimizer state is saved, "
            f"and an SVD of each still runs every {t.galore_update_proj_gap} steps",
            f"remove galore_rank (auto takes half of lora_r: {auto}) or set it below {r}"
            if auto < r
            else "with lora_r 1 there is nothing to project: use optimizer: adamw_torch",
            f"{d.galore_rank}>={r}",
            galore_rank=d.galore_rank,
            lora_r=r,
        )
    if dora and t.lora_dropout > 0 and t.dora_dropout == "input":  # only when PEFT's slow path is taken
        add(
            "warn",
            "dora-with-dropout",
            f"DoRA with lora_dropout {t.lora_dropout:g} and dora_dropout: input: PEFT reuses the base output only at "
            "dropout 0, so every adapted layer pays a second base matmul (measured here: 5.1 vs 3.9 s/step, x1.3)",
            "set dora_dropout: branch (dropout on the low-rank branch only, base output reused, as torchtune "
            "and mlx-lm do; the saved adapter is the same standard PEFT DoRA adapter), or lora_dropout: 0.0",
            f"{t.lora_dropout:g}",
            lora_dropout=t.lora_dropout,
            dora_dropout=t.dora_dropout,
        )
    if d.purpose == "train" and version_out_of_range(t, hw.peft_version):
        add(
            "warn",
            "dora-forward-peft-version",
            f"PEFT {hw.peft_version} is outside {PEFT_RANGE_TEXT}, the releases dlm's faster DoRA forward is "
            "tested against (it stands in for part of PEFT's DoRA code): this run uses PEFT's own forward, "
            "slower per step (DoRA/LoRA x1.06-1.08 with dlm's forward, up to x1.29 with PEFT's in make bench)",
            "install a PEFT in that range (constraints.txt pins peft==0.21.2), or set dora_forward: peft",
            f"peft={hw.peft_version}",
            peft_version=hw.peft_version,
            tested=PEFT_RANGE_TEXT,
        )
    if d.precision == "bf16" and hw.device == "cpu" and not hw.native_bf16:
        add(
            "warn",
            "bf16-emulated-cpu",
            "precision bf16 on a CPU without amx_bf16 / avx512_bf16 is emulated: a step ran ~14x slower than "
            "fp32 (96 vs 7 s, SmolLM2-135M, batch 4 x 128)",
            "set precision: fp32 (or auto)",
            "no-native-bf16",
            cpu_flags=list(hw.cpu_flags),
        )
    if d.precision == "fp16" and hw.device == "cpu":
        add(
            "warn",
            "fp16-on-cpu",
            "precision fp16 on a CPU: accelerate does no fp16 autocast there, the base is loaded in half "
            "precision and CPU kernels have no fast fp16 path (unmeasured; assumed as slow as emulated bf16)",
            "set precision: fp32 (or auto)",
            "cpu",
            device=hw.device,
        )


def _run_warnings(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Warnings: a run that will learn little, or runs code from the model."""
    t = spec.training
    if t.learning_rate <= LORA_LOW_LR and "sft" in d.phases:  # every adapter here is a LoRA variant
        add(
            "warn",
            "lora-lr-low",
            f"learning_rate {t.learning_rate:g} is a full-fine-tune rate; LoRA wants roughly 10x that "
            "(TRL's 'LoRA Without Regret')",
            "try learning_rate: 2.0e-4",
            f"{t.learning_rate:g}",
            learning_rate=t.learning_rate,
            threshold=LORA_LOW_LR,
        )
    # Every update the adapter gets counts: a two-phase run's DPO steps train the same adapter.
    two_phase = d.phases == ("sft", "dpo")
    all_steps = d.optimizer_steps + (d.dpo_steps if two_phase else 0)
    if all_steps < FEW_STEPS:
        add(
            "warn",
            "few-steps",
            f"only {all_steps} optimizer steps"
            + (f" (SFT {d.optimizer_steps} + DPO {d.dpo_steps})" if two_phase else "")
            + ": the adapter will barely move",
            "raise num_epochs or max_steps, add examples, or lower grad_accum",
            f"{all_steps}<{FEW_STEPS}",
            optimizer_steps=all_steps,
            threshold=FEW_STEPS,
        )
    if spec.trust_remote_code:
        add(
            "warn",
            "trust-remote-code",
            "trust_remote_code is on: loading the base runs Python code shipped with the model",
            "turn it off unless you have read the model repository's code",
            "on",
            trust_remote_code=True,
        )


def _corpus_warnings(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Warnings: examples the run will not see whole."""
    cut = [(n, where) for n, where in corpus.lengths if n > d.sequence_len > 0]
    if not cut:
        return
    (first_tokens, first), longest = cut[0], max(n for n, _ in cut)
    t, ctx = spec.training, base.context_len
    by_user = "sequence_len" in t.model_fields_set and t.sequence_len < ctx  # else the base's context cuts
    add(
        "warn",
        "examples-truncated",
        f"{len(cut)} example(s) are longer than sequence_len {d.sequence_len} and lose their end "
        f"(loss and eval never see it); the first is {first} ({first_tokens} tokens, {corpus.counted})",
        f"raise sequence_len to {min(longest, ctx)} or more, or remove the key so dlm fits the longest example "
        f"(up to {base.name}'s context, {ctx}); or split the long examples"
        if by_user
        else f"{base.name} has no positions beyond its context of {ctx} tokens: split the long examples",
        f"{len(cut)}>{d.sequence_len}",
        n_truncated=len(cut),
        sequence_len=d.sequence_len,
        first=first,
        first_tokens=first_tokens,
        longest_tokens=longest,
        exact=corpus.exact,
    )


# --- information: worth knowing, nothing to fix necessarily -----------------------------------


def _dora_infos(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Information on DoRA: where its per-step tax is or is not worth paying."""
    t = spec.training
    dora = t.adapter == "dora"
    if dora and t.lora_r >= DORA_HIGH_RANK:
        add(
            "info",
            "dora-high-rank",
            f"DoRA at r={t.lora_r}: its edge over LoRA is at low rank; at 32+ the gap closes (~2 points like for "
            "like on LLaMA-7B) while the per-step tax stays (+26% time at r=32, PEFT MetaMathQA)",
            "compare with a LoRA twin (dlm twin --set training.adapter=lora) or lower lora_r",
            lora_r=t.lora_r,
            threshold=DORA_HIGH_RANK,
        )
    if dora and d.optimizer_steps < DORA_SHORT_RUN_STEPS:
        add(
            "info",
            "dora-short-run",
            f"DoRA for {d.optimizer_steps} optimizer steps: the per-step tax is not amortised by a short run",
            "compare with a LoRA twin before paying for DoRA",
            optimizer_steps=d.optimizer_steps,
            threshold=DORA_SHORT_RUN_STEPS,
        )
    if dora and d.micro_batch_size == 1:
        add(
            "info",
            "dora-small-batch",
            "DoRA with micro batch 1: the fixed per-step weight-norm work (O(r*d*k) per adapted layer, "
            "independent of tokens) dominates small batches",
            "raise micro_batch_size if memory allows (trade grad_accum for it)",
            micro_batch_size=1,
        )
    if dora and d.purpose == "prompt":
        add(
            "info",
            "dora-unmerged-inference",
            "DoRA adapter: dlm prompt merges it into the base in memory; served unmerged, it costs far more per "
            "token (+139% time on Llama-3.1-8B, PEFT docs)",
            "serve the merged model from `dlm export`, or call merge_and_unload() before generating",
            purpose=d.purpose,
        )


def _run_infos(spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add) -> None:
    """Information: worth knowing, nothing to fix necessarily."""
    t = spec.training
    qlora = t.adapter == "qlora"
    galore = t.optimizer.startswith("galore")
    if galore:
        add(
            "info",
            "galore-with-adapter",
            f"GaLore with a {t.adapter} adapter: the adapter's optimizer state is already tiny; GaLore projects "
            f"only its lora_A/lora_B matrices (galore_rank {d.galore_rank} vs lora_r {t.lora_r})",
            "use optimizer: adamw_torch (LLaMA-Factory rejects GaLore + LoRA outright)",
            galore_rank=d.galore_rank,
            lora_r=t.lora_r,
        )
    if qlora and hw.device == "cpu":
        add(
            "info",
            "qlora-slow-on-cpu",
            "QLoRA on a CPU: bitsandbytes 4-bit runs, but a step costs ~1.7x LoRA's (6.2 vs 3.7 s measured); "
            "it saves memory, not time",
            "use adapter: lora unless memory is the limit",
            device=hw.device,
        )
    if t.sequence_len > base.context_len:
        add(
            "info",
            "seq-len-clipped",
            f"sequence_len {t.sequence_len} is above {base.name}'s context of {base.context_len}; clipped",
            f"set sequence_len: {base.context_len} or less",
            sequence_len=t.sequence_len,
            context_len=base.context_len,
        )
    if corpus.kept_whole and t.eval_fraction > 0:  # kept whole only by a hash split
        names = {"prose": "prose piece", "instruction": "Q/A pair", "preference": "preference triple"}
        kinds = " and ".join(f"{n} {names[kind]}{'s' if n > 1 else ''}" for kind, n in corpus.kept_whole)
        needed = max(2, math.ceil(MIN_HELDOUT_SHARE / t.eval_fraction - 1e-9))
        add(
            "info",
            "heldout-too-few",
            f"too few examples of a kind to hold any out: {kinds} (a kind needs {needed} at eval_fraction "
            f"{t.eval_fraction:g}), so all of them train",
            "pin the examples to judge on with `::instruction heldout::` (they never train), or add examples",
            kept_whole=dict(corpus.kept_whole),
            eval_fraction=t.eval_fraction,
            needed=needed,
        )
    if 0 < corpus.n_heldout < HELDOUT_FOR_MIN_GAIN:
        add(
            "info",
            "heldout-too-small",
            f"{corpus.n_heldout} held-out example{'s' if corpus.n_heldout > 1 else ''}: too few for `dlm compare` "
            f"to resolve its default {COMPARE_MIN_GAIN:.0%} min gain (about {HELDOUT_FOR_MIN_GAIN} are needed at "
            f"a per-example spread of {EXAMPLE_SPREAD:g}, docs/compare.md), so twins will mostly come out inconclusive",
            "pin more examples to judge on with `::instruction heldout::` (they never train), raise eval_fraction, "
            "or add examples",
            n_heldout=corpus.n_heldout,
            needed=HELDOUT_FOR_MIN_GAIN,
            example_spread=EXAMPLE_SPREAD,
            min_gain=COMPARE_MIN_GAIN,
        )
    if corpus.n_heldout == 0:
        add(
            "info",
            "no-heldout",
            "the held-out set is empty: training reports no eval loss, and `dlm compare` needs held-out "
            "examples to judge which adapter answers better",
            "pin the examples to judge on with `::instruction heldout::` (they never train, and no others "
            "are drawn), or keep eval_fraction above 0 (default 0.1) with enough examples of each kind",
            n_heldout=0,
            eval_fraction=t.eval_fraction,
        )
    if corpus.sources:
        add(
            "info",
            "sources-read",
            "training.sources: "
            + "; ".join(f"{path}: {n} file(s), {tok} tokens" for path, n, tok in corpus.sources)
            + f" ({corpus.counted})",
            "narrow a source with include / exclude globs or max_files",
            f"{sum(n for _, n, _ in corpus.sources)} files",
            sources={path: {"files": n, "tokens": tok} for path, n, tok in corpus.sources},
        )
    if corpus.skipped:
        add(
            "info",
            "sources-skipped",
            "files skipped in training.sources: " + "; ".join(f"{path}: {n} {why}" for path, why, n in corpus.skipped),
            "save text files as UTF-8 and raise max_bytes_per_file / max_files to read them; "
            "exclude globs silence the files you never meant to read",
            f"{sum(n for _, _, n in corpus.skipped)} skipped",
            skipped=[{"source": path, "why": why, "files": n} for path, why, n in corpus.skipped],
        )
    if spec.dlm_version in ORIGINAL_VERSIONS:
        add(
            "info",
            "original-format",
            version_note(spec.dlm_version) + ": it uses only features dlm supports",
            "`dlm migrate FILE` rewrites it in dlm's own format (comments kept, a .bak beside it)",
            f"v{spec.dlm_version}",
            dlm_version=spec.dlm_version,
        )
    if base.n_params < DEMO_MAX_PARAMS:
        add(
            "info",
            "base-demo-only",
            f"{base.name} has {base.params_label} parameters: fine for plumbing, weak for learning facts",
            "use a base of 0.5B or more (e.g. qwen2.5-0.5b, llama-3.2-1b) for real work",
            n_params=base.n_params,
            threshold=DEMO_MAX_PARAMS,
        )


def _preference_rules(
    spec: Spec, hw: HardwareFacts, base: BaseFacts, corpus: CorpusStats, d: Derived, add: Add
) -> None:
    """objective: dpo (docs/preference.md): a rate, pair count or beta that will not train well, no SFT phase."""
    if "dpo" not in d.phases:
        return
    p = spec.training.preference
    if p.learning_rate > DPO_LR_HIGH:
        add(
            "warn",
            "dpo-lr-high",
            f"preference.learning_rate {p.learning_rate:g} is an SFT-sized rate: DPO at it tends to push both "
            "the chosen and the rejected answers' likelihood down together",
            "try preference.learning_rate: 5.0e-5 (LoRA DPO recipes use 5e-6 to 5e-5)",
            f"{p.learning_rate:g}>{DPO_LR_HIGH:g}",
            learning_rate=p.learning_rate,
            threshold=DPO_LR_HIGH,
        )
    if corpus.n_preference < DPO_FEW_PAIRS:
        add(
            "warn",
            "dpo-few-pairs",
            f"only {corpus.n_preference} preference triples to train on: DPO learns a direction from pairs, "
            "and this few mostly teaches the pairs themselves",
            f"write at least {DPO_FEW_PAIRS} ::preference:: triples",
            f"{corpus.n_preference}<{DPO_FEW_PAIRS}",
            pairs=corpus.n_preference,
            threshold=DPO_FEW_PAIRS,
        )
    if not DPO_BETA_LOW <= p.beta <= DPO_BETA_HIGH:
        low = p.beta < DPO_BETA_LOW
        add(
            "warn",
            "dpo-beta-extreme",
            f"preference.beta {p.beta:g} is "
            + (
                "so low that nothing holds the adapter near the reference"
                if low
                else "so high that the adapter can barely move from the reference"
            ),
            "beta between 0.05 and 0.5 is usual; 0.1 is the default",
            f"{p.beta:g}",
            beta=p.beta,
            low=DPO_BETA_LOW,
            high=DPO_BETA_HIGH,
        )
    if "sft" not in d.phases:
        add(
            "info",
            "dpo-without-sft",
            "DPO only: the base never saw the chosen answers' format before it learns to prefer them",
            "add ::instruction:: examples (an SFT phase runs first), or accept it for a style the base already writes",
            pairs=corpus.n_preference,
        )


# What `collect` runs, in order: within a level, findings come out in the order their rules are written.
_RULES = (
    _machine_blocks,
    _package_blocks,
    _setup_blocks,
    _fit_blocks,
    _speed_warnings,
    _run_warnings,
    _corpus_warnings,
    _dora_infos,
    _run_infos,
    _preference_rules,
)


def reason_line(head: dict[str, str], findings: tuple[Finding, ...]) -> str:
    """`reason: precision=fp32, ..., block=code(tag), warn=code(tag),code(tag)`; infos are left out."""
    parts = [f"{k}={v}" for k, v in head.items()]
    for level in ("block", "warn"):
        codes = [f"{f.code}({f.tag})" if f.tag else f.code for f in findings if f.level == level]
        if codes:
            parts.append(f"{level}={','.join(codes)}")
    return "reason: " + ", ".join(parts)


# --- export: `dlm export` checks its format against the adapter and the base ---------------------

EXPORT_FORMATS = ("hf", "gguf", "ollama", "peft")
GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> GGUF architecture
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0")  # what the gguf package writes here (docs/export.md)
LOSSY_QUANTS = frozenset({"q8_0"})


def export_findings(
    fmt: str, quant: str | None, model_type: str, dora: bool, agreement: tuple[int, int] | None = None
) -> tuple[Finding, ...]:
    """Findings about one export: before the weights load (`agreement` None) and after a lossy
    quantisation was measured (`agreement` = greedy next tokens that agree, positions compared)."""
    out: list[Finding] = []
    gguf = fmt in ("gguf", "ollama")
    if gguf and model_type not in GGUF_ARCHS:
        archs = sorted(GGUF_ARCHS)
        out.append(
            Finding(
                "block",
                "gguf-arch-unsupported",
                f"--format {fmt} writes GGUF for the architectures {', '.join(archs)}; this base is {model_type!r}",
                "export --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py",
                {"model_type": model_type, "supported": archs},
                model_type,
            )
        )
    if fmt == "peft" and dora:
        out.append(
            Finding(
                "info",
                "dora-not-vllm-servable",
                "DoRA adapter: PEFT and transformers load it, but vLLM serves LoRA adapters only (DoRA support "
                "is an open request, vllm #10849)",
                "for vLLM, export --format hf (merged: a plain model, DoRA's cost gone) and serve that",
                {"adapter": "dora"},
            )
        )
    if gguf and quant in LOSSY_QUANTS and agreement is not None:
        same, total = agreement
        out.append(
            Finding(
                "info",
                "export-quant-lossy",
                f"{quant} rounds every weight matrix to 8 bits per block of 32: the greedy next token agreed "
                f"with the merged model at {same} of {total} positions of the document's held-out examples (its "
                "training examples when none are held out)",
                "use --quant f16 for the exact model (twice the size), or check answers with `dlm prompt`",
                {"quant": quant, "agree": same, "positions": total},
                quant,
            )
        )
    return tuple(out)
