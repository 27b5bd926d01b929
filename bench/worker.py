"""One benchmark run, in its own process: a plain TRL script, or dlm's training path, on one document.

`make bench` (bench/harness.py) starts `python bench/worker.py CONFIG_JSON` once per configuration, so
every run pays its own imports and its peak RSS is its own. The worker prints one line,
`BENCH_RESULT {...}`, and nothing else that matters. Kinds:

- `plain`: the script the TRL documentation shows: `SFTTrainer(model=<folder>, train_dataset=...,
  args=SFTConfig(...), peft_config=LoraConfig(...))`, TRL's defaults for everything but what must
  match dlm's run for the comparison to mean anything (the document's rows, rank, alpha, dropout,
  targets, learning rate, sequence length and batch), plus `use_cpu` on a CPU. bf16 is TRL's
  default (on) unless the machine has no fast bf16, where it would be ~14x slower (then off).
- `same`: `dlm.train.run` with a plan forced to the plain script's knobs (checkpointing on, PEFT's
  DoRA dropout, fp32 weights with the same autocast, TRL's default optimizer, no evaluation or
  checkpoints in the loop).
- `dlm`: `dlm.train.run` with the plan `dlm train` would use for the document.
- `prepare`: converts the document's base into its folder (the embedded GGUF, ~40 s once) and trains
  nothing, so no timed run pays for it (a conversion leaves the process's heap larger and slower).
- `packed`, `malloc-off`, `ckpt-on`: dlm's plan with one decision undone (`packing: true`; glibc's
  default allocator; activation checkpointing on), so the bench measures what each decision earns.

Timing is identical for all kinds (one TrainerCallback): each optimizer step's compute time, the
pauses after it (evaluation, saving), and the wall time of the training loop. Both ETAs are replayed
from that timeline: the cumulative average (HF Trainer / tqdm style) and `progress.EtaEstimator`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _timeline_callback(box: dict) -> Any:
    from transformers import TrainerCallback

    class Timeline(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            box["t0"] = box["mark"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            box["t_step"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            box["steps"].append((state.global_step, box["t_step"], now))
            box["mark"] = now
            if "trainer" in box:  # the plain script: TRL's running count of non-padding tokens
                box["tokens"][state.global_step] = int(box["trainer"]._total_train_tokens)

        def on_evaluate(self, args, state, control, **kw):
            self._pause()

        def on_save(self, args, state, control, **kw):
            self._pause()

        def on_train_end(self, args, state, control, **kw):
            box["t_end"] = time.perf_counter()

        @staticmethod
        def _pause() -> None:
            now = time.perf_counter()
            box["pauses"].append((box["mark"], now))
            box["mark"] = now

    return Timeline()


def _etas(box: dict, total: int) -> dict[str, Any]:
    """Projected total training time at 10% of the run, by both methods, and the real total."""
    from dlm.train.progress import EtaEstimator

    at = max(1, math.ceil(total * 0.1))
    eta = EtaEstimator(total)
    eta.start(box["t0"], 0)
    for start, end in box["pauses"]:
        eta.pause(start, end)
    result: dict[str, Any] = {"eta_step": at, "real_total_s": box["t_end"] - box["t0"]}
    for step, _, end in box["steps"]:
        eta.step(step, end)
        if step == at:
            elapsed = end - box["t0"]
            steady = eta.eta(end)
            result["eta_dlm_total_s"] = elapsed + steady if steady is not None else None
            result["eta_hf_total_s"] = elapsed + eta.cumulative_eta(end)
    return result


def _summary(box: dict, total: int) -> dict[str, Any]:
    """Steady s/step (dlm's own `steady_step_seconds`: the median after warm-up) and tokens/s over the
    steps after warm-up: steps differ in length (rows are padded to the longest of their batch), so
    tokens/s is tokens over time, not a median."""
    from dlm.train.progress import WARMUP_STEPS, steady_step_seconds

    times = [end - start for _, start, end in box["steps"]]
    tokens = box["tokens"]
    last = box["steps"][-1][0]
    first = WARMUP_STEPS if len(times) > WARMUP_STEPS and WARMUP_STEPS in tokens else 0
    steady_tokens = tokens.get(last, 0) - tokens.get(first, 0)
    return {
        "steps": len(times),
        "steady_s": steady_step_seconds(times),
        "min_s": min(times[first:] or times),
        "tokens": tokens.get(last, 0),
        "tokens_per_s": steady_tokens / sum(times[first:]) if sum(times[first:]) > 0 else None,
        "step_times": [round(t, 4) for t in times],
        "pause_s": sum(e - s for s, e in box["pauses"]),
        **_etas(box, total),
    }


def _base_folder(p: Any, cfg: dict) -> Path:
    from dlm.train import basefolder

    return basefolder.materialize(p.base, Path(cfg["home"]))


def _prepare(cfg: dict, hw: Any, extra: dict | None = None) -> Any:
    from dlm.plan.prepare import prepare
    from dlm.train import basefolder

    knobs = {"adapter": cfg["adapter"], "lora_dropout": cfg["dropout"], **cfg.get("overrides", {}), **(extra or {})}
    home = Path(cfg["home"])
    return prepare(  # token counts exact, as `dlm train` plans them
        cfg["file"],
        hw,
        max_steps=cfg["steps"],
        training_overrides=knobs,
        home=home,
        base_folder=lambda base: basefolder.materialize(base, home),
    )


def _optim_name(optim: Any) -> str:
    """TrainingArguments.optim is an OptimizerNames enum once the config is built; its plain name."""
    return str(getattr(optim, "value", optim))


def plain_bf16(hw: Any) -> bool:
    """TRL's default bf16=True, kept where it is fast (CUDA >= 8.0, a CPU with native bf16)."""
    if hw.device == "cuda":
        return bool(hw.compute_capability and hw.compute_capability >= (8, 0))
    return hw.device == "cpu" and hw.native_bf16


def run_plain(cfg: dict, hw: Any, out: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from dlm.train.evaluate import eval_loss
    from dlm.train.rows import rows
    from dlm.train.run import peak_memory

    p = _prepare(cfg, hw)
    base_folder = _base_folder(p, cfg)
    kw = p.plan.sft_kwargs
    tokenizer = AutoTokenizer.from_pretrained(str(base_folder))
    box: dict = {"steps": [], "pauses": [], "tokens": {}}
    trainer = SFTTrainer(
        model=str(base_folder),
        train_dataset=Dataset.from_list(rows(p.train, tokenizer)),
        args=SFTConfig(
            output_dir=str(out),
            max_length=kw["max_length"],
            max_steps=cfg["steps"],
            per_device_train_batch_size=kw["per_device_train_batch_size"],
            gradient_accumulation_steps=kw["gradient_accumulation_steps"],
            learning_rate=kw["learning_rate"],
            seed=kw["seed"],
            report_to="none",
            use_cpu=hw.device == "cpu",
            bf16=plain_bf16(hw),
        ),
        peft_config=LoraConfig(
            r=p.plan.lora_kwargs["r"],
            lora_alpha=p.plan.lora_kwargs["lora_alpha"],
            lora_dropout=cfg["dropout"],
            target_modules=p.plan.lora_kwargs["target_modules"],
            use_dora=cfg["adapter"] == "dora",
            task_type="CAUSAL_LM",
        ),
        callbacks=[_timeline_callback(box)],
    )
    box["trainer"] = trainer
    trainer.train()
    loss = eval_loss(trainer.model, trainer.processing_class, p.heldout, max_length=kw["max_length"])
    return {
        **_summary(box, cfg["steps"]),
        "eval_loss": loss,
        "peak_bytes": peak_memory(),
        "micro": kw["per_device_train_batch_size"],
        "accum": kw["gradient_accumulation_steps"],
        "checkpointing": True,
        "bf16": plain_bf16(hw),
        "optim": _optim_name(trainer.args.optim),
    }


def same_knobs(plan: Any, hw: Any) -> Any:
    """`plan` forced to the plain script's knobs (see the module docstring)."""
    from trl import SFTConfig

    sft = {k: v for k, v in plan.sft_kwargs.items() if k != "eval_steps"}
    # the plain script's optimizer is TRL's default (adamw_torch_fused with this stack)
    trl_optim = SFTConfig(output_dir=tempfile.gettempdir(), use_cpu=hw.device == "cpu", bf16=plain_bf16(hw)).optim
    sft.update(
        activation_checkpointing=True,
        eval_strategy="no",
        save_strategy="no",
        packing=False,
        bf16=plain_bf16(hw),
        fp16=False,
        optim=_optim_name(trl_optim),
    )
    return dataclasses.replace(
        plan, sft_kwargs=sft, runtime_kwargs={}, model_kwargs={**plan.model_kwargs, "dtype": "float32"}
    )


def run_dlm(cfg: dict, hw: Any, out: Path) -> dict[str, Any]:
    from dlm.train import run as train

    extra = {
        "same": {"dora_dropout": "input"},
        "packed": {"packing": True},
        "ckpt-on": {"gradient_checkpointing": True},
    }.get(cfg["kind"])
    if cfg["kind"] == "dlm" and cfg["adapter"] == "dora" and cfg["dropout"] > 0:
        extra = {"dora_dropout": "branch"}  # the "with the branch-dropout option"; the default is PEFT's form
    p = _prepare(cfg, hw, extra)
    plan = same_knobs(p.plan, hw) if cfg["kind"] == "same" else p.plan
    if cfg["kind"] == "malloc-off":  # the plan with glibc's default allocator
        plan = dataclasses.replace(plan, runtime_kwargs={k: v for k, v in plan.runtime_kwargs.items() if k != "malloc"})
    base_folder = _base_folder(p, cfg)
    box: dict = {"steps": [], "pauses": [], "tokens": {}}

    def on_step(step: int, max_steps: int, loss: Any, tokens: int, elapsed: float) -> None:
        box["tokens"][step] = tokens  # cumulative, from TRL's num_tokens (the plan logs every step)

    summary = train.run(
        plan,
        p.train,
        p.heldout,
        base_folder,
        out,
        callbacks=[_timeline_callback(box)],
        eval_base=False,
        on_step=on_step,
    )
    if summary.status != "ok":
        raise RuntimeError(f"the dlm run ended {summary.status}: {summary.message}")
    est = p.plan.estimates
    dpo = plan.phases == ("dpo",)  # a DPO-only document (bench/gpu.py's dpo runs): its own step and config
    kw = plan.dpo_kwargs if dpo else plan.sft_kwargs
    return {
        **_summary(box, cfg["steps"]),
        "eval_loss": summary.eval_loss,
        "peak_bytes": summary.peak_memory_bytes,
        "micro": kw["per_device_train_batch_size"],
        "accum": kw["gradient_accumulation_steps"],
        "checkpointing": kw["activation_checkpointing"],
        "bf16": kw["bf16"],
        "packing": kw.get("packing", False),
        "runtime": plan.runtime_kwargs,
        "optim": kw["optim"],
        "est_step_s": plan.decision("dpo_step_seconds") if dpo else est.step_seconds,
        "est_peak_bytes": est.peak_memory_bytes,
        "est_total_s": est.total_seconds,
        "reason": p.plan.reason,
    }


def main(argv: list[str]) -> int:
    from dlm.train import device
    from dlm.train.loop import quiet_progress

    cfg = json.loads(argv[0])
    hw = device.probe()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlm-bench-") as tmp, quiet_progress():
        if cfg["kind"] == "prepare":  # the base folder, converted once before any timed run
            result = {"base_folder": str(_base_folder(_prepare(cfg, hw), cfg))}
        elif cfg["kind"] == "plain":
            result = run_plain(cfg, hw, Path(tmp))
        else:
            result = run_dlm(cfg, hw, Path(tmp))
    result.update(config=cfg, wall_s=time.perf_counter() - t0)
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
