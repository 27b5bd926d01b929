"""The plain kwargs a plan carries, built from what `make_plan` decided. Pure.

`lora_kwargs` -> `peft.LoraConfig(**...)`; `sft_kwargs` and `sft_extras` -> `trl.SFTConfig(output_dir=..., **...)`;
`model_kwargs` -> `from_pretrained` (dtype, attention, 4-bit quantisation as `BitsAndBytesConfig` kwargs).
Only `dlm.train` builds those objects (rule 6 of the design), and `tests/test_plan.py` binds every
shipped config's kwargs to the real signatures, so an upstream rename fails in CI.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from dlm.doc.schema import Preference, Training
from dlm.plan.batch import Batch
from dlm.plan.hardware import HardwareFacts


def lora_kwargs(t: Training, targets: list[str], dora: bool) -> dict[str, Any]:
    return {
        "r": t.lora_r,
        "lora_alpha": t.lora_alpha,
        "lora_dropout": t.lora_dropout,
        "target_modules": targets,
        "use_dora": dora,
        "use_rslora": t.use_rslora,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def sft_kwargs(
    t: Training,
    hw: HardwareFacts,
    precision: str,
    b: Batch,
    seq: int,
    optim: str,
    eval_steps: int | None,
    save_steps: int,
) -> dict[str, Any]:
    sft: dict[str, Any] = {
        "per_device_train_batch_size": b.micro,
        "per_device_eval_batch_size": b.micro,
        "gradient_accumulation_steps": b.accum,
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
        "activation_checkpointing": b.ckpt,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if eval_steps else "no",
        "save_strategy": "steps",
        "save_steps": save_steps,
        # transformers' own tracker callbacks write under output_dir (checkpoints/, pruned after a commit):
        # dlm writes `report_to`'s log itself into runs/rNNNN/logs/ (plan/optional.py, train/logs.py).
        "report_to": "none",
    }
    if eval_steps:
        sft["eval_steps"] = eval_steps
    return sft


def sft_extras(t: Training, targets: list[str], world: int, sharding: str) -> dict[str, Any]:
    """The SFTConfig kwargs only several processes or GaLore need."""
    extras: dict[str, Any] = {}
    if world > 1 and sharding == "none":
        # Every adapter weight takes part in every forward, so DDP's search for unused parameters (on
        # by default for a PEFT model) is an extra autograd traversal per step that finds nothing.
        extras["ddp_find_unused_parameters"] = False
    if t.optimizer.startswith("galore"):
        # A str is a full-match regex (a list would substring-match the lora.Linear wrappers too and log
        # "matched but ignored" for each): exactly PEFT's `<...>.<target>.lora_A.default` / `lora_B` layers.
        extras["optim_target_modules"] = rf".*\.(?:{'|'.join(re.escape(m) for m in targets)})\.lora_[AB]\.default"
        # galore_rank is the planner's number by now (plan/optional.py resolves auto)
        extras["optim_args"] = f"rank={t.galore_rank},update_proj_gap={t.galore_update_proj_gap},scale={t.galore_scale}"
    return extras


def model_kwargs(
    precision: str, attn: str, qlora: bool, sharding: str, decide: Callable[[str, Any, str], Any]
) -> dict[str, Any]:
    """`from_pretrained`'s kwargs; `decide` records the one choice made here (4-bit storage under sharding)."""
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
    return {"dtype": dtype, "attn_implementation": attn, "quantization": quant}


SFT_ONLY = ("packing", "completion_only_loss")  # SFTConfig kwargs DPOConfig does not take


def dpo_kwargs(sft: dict[str, Any], p: Preference) -> dict[str, Any]:
    """`trl.DPOConfig(output_dir=..., **...)`: the SFT phase's batch, precision, seed and schedule,
    with the preference block's rate, epochs, beta and loss. `max_steps` (spec or `--max-steps`)
    bounds each phase."""
    kw = {k: v for k, v in sft.items() if k not in SFT_ONLY}
    kw.update(
        learning_rate=p.learning_rate,
        num_train_epochs=float(p.num_epochs),
        beta=p.beta,
        loss_type=[p.loss_type],
    )
    return kw
