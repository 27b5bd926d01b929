"""The DPO phase (`training.objective: dpo`): preference rows, TRL's `DPOTrainer` on a PEFT model, and
the preference measurements. docs/preference.md has the policy; `dlm.train.run` calls this.

- Rows: `{"prompt", "chosen", "rejected"}` as text, the prompt rendered exactly as `dlm prompt`
  renders a question (`rows.render_chat`: the base's chat template, the document's `system_prompt`,
  the generation prompt), each answer as the template writes it after that prompt (the answer and the
  end-of-turn token). TRL tokenizes prompt and prompt+answer and takes the answer's tokens from where
  they diverge; `template_mismatch` checks beforehand that they do not diverge inside the prompt.
- Reference: never a second model. A fresh adapter (DPO only) is compared against the base with the
  adapter switched off (`ref_model=None` with a `peft_config`); after an SFT phase TRL copies the SFT
  adapter into a frozen second adapter named "ref" (reference: sft), or dlm removes that copy so the
  adapter switched off is the reference again (reference: base).
- Measurements (`measure`): per triple, the summed log-probability of each answer's tokens given the
  prompt, for the adapter and for the base (adapter switched off). `pref_accuracy`: share of triples
  where the model gives the chosen answer the higher log-probability (the base's too, so the two
  compare); `reward_margin`: mean implicit reward margin beta x ((c - r) adapter - (c - r) base),
  the base being the implicit reward's zero; `reward_accuracy`: share where that margin is positive.
  The held-out triples' margins are kept one by one too (metrics.json `pref_per_example`), so
  `dlm compare --metric pref_accuracy / reward_margin` can resample them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlm.plan.corpus import Example
from dlm.plan.planner import Plan
from dlm.train.loop import trainer_args
from dlm.train.rows import render_chat

TRAIN_SAMPLE = 32  # training triples measured besides every held-out one


def pair_rows(examples: Sequence[Example], tokenizer: Any) -> list[dict[str, str]]:
    """Preference examples -> DPO rows of text, through the base's chat template."""
    out = []
    for ex in examples:
        head, chosen = render_chat(tokenizer, ex.prompt, ex.completion, ex.system)
        _, rejected = render_chat(tokenizer, ex.prompt, ex.rejected, ex.system)
        out.append({"prompt": head, "chosen": chosen, "rejected": rejected})
    return out


def _prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def template_mismatch(rows: Sequence[dict[str, str]], examples: Sequence[Example], tokenizer: Any) -> dict | None:
    """The `preference-template-mismatch` finding when an answer's tokens do not start where the
    prompt's end: then the model is trained on a context `dlm prompt` never shows it."""
    bad = []
    for row, ex in zip(rows, examples, strict=True):
        head = tokenizer(text=row["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            full = tokenizer(text=row["prompt"] + row[key])["input_ids"]
            if _prefix(head, full) < len(head):
                bad.append(f"{ex.where} ({key})")
    if not bad:
        return None
    return {
        "level": "warn",
        "code": "preference-template-mismatch",
        "message": f"{len(bad)} preference answers do not begin where the prompt as `dlm prompt` renders it "
        "ends (the chat template or tokenizer joins them differently), so DPO trains on another context",
        "hint": "use a base whose chat template renders the prompt as a prefix of prompt + answer",
        "evidence": {"answers": bad[:5], "n": len(bad)},
        "tag": str(len(bad)),
    }


def dpo_config(plan: Plan, output_dir: Path, *, max_steps: int | None = None, has_eval: bool = True) -> Any:
    """`DPOConfig(output_dir=..., **plan.dpo_kwargs)`, with the run mechanics `sft_config` adds."""
    from trl import DPOConfig

    return trainer_args(DPOConfig, plan.dpo_kwargs, output_dir, max_steps, has_eval)


def dpo_trainer(
    plan: Plan,
    args: Any,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, str]],
    held_rows: list[dict[str, str]],
    callbacks: list[Any],
) -> Any:
    """TRL's DPOTrainer: a new LoRA adapter on the base, or the SFT phase's PEFT model trained on."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback, ProgressCallback
    from trl import DPOTrainer

    continuing = isinstance(model, PeftModel)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held_rows) if held_rows else None,
        processing_class=tokenizer,
        peft_config=None if continuing else LoraConfig(**plan.lora_kwargs),
        callbacks=callbacks,
    )
    peft_model = trainer.model
    if continuing and plan.reference == "base" and "ref" in peft_model.peft_config:
        peft_model.delete_adapter("ref")  # the reference is the adapter switched off: the base
        peft_model.set_adapter("default")
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _answer_logps(model: Any, tokenizer: Any, prompt: str, answer: str, max_length: int | None) -> float:
    """Summed log-probability of `answer`'s tokens after `prompt` (tokenized as TRL does)."""
    import torch

    eos = tokenizer.eos_token or ""
    if eos and not answer.endswith(eos):
        answer += eos
    head = tokenizer(text=prompt)["input_ids"]
    ids = tokenizer(text=prompt + answer)["input_ids"]
    start = _prefix(head, ids)
    if max_length is not None:
        ids = ids[:max_length]
    if start >= len(ids) or start == 0:
        return 0.0
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    logits = model(input_ids=x).logits[0, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return float(logps[start - 1 :].sum())


def _logps(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, str]], max_length: int | None
) -> list[tuple[float, float]]:
    return [
        (
            _answer_logps(model, tokenizer, r["prompt"], r["chosen"], max_length),
            _answer_logps(model, tokenizer, r["prompt"], r["rejected"], max_length),
        )
        for r in rows
    ]


def measure(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    beta: float,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Preference accuracy and reward margin of the adapter and of the base on `examples` (see the
    module docstring), and `per_example`: the triples' ids and each one's log p(chosen) - log
    p(rejected) for the adapter and the base, in order. Empty examples -> n = 0 and no figures."""
    import torch

    if not examples:
        return {"n": 0}
    rows = pair_rows(examples, tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            adapter = _logps(model, tokenizer, rows, max_length)
            with model.disable_adapter():
                base = _logps(model, tokenizer, rows, max_length)
    finally:
        model.train(was_training)
    n = len(rows)
    margins = [beta * ((c - r) - (bc - br)) for (c, r), (bc, br) in zip(adapter, base, strict=True)]
    return {
        "n": n,
        "pref_accuracy": sum(c > r for c, r in adapter) / n,
        "base_pref_accuracy": sum(c > r for c, r in base) / n,
        "reward_accuracy": sum(m > 0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "logp_margin": sum(c - r for c, r in adapter) / n,
        "base_logp_margin": sum(c - r for c, r in base) / n,
        # per triple, in order, for compare's paired bootstrap (the store keeps the held-out one)
        "per_example": {
            "ids": [e.id for e in examples],
            "logp_margin": [c - r for c, r in adapter],
            "base_logp_margin": [c - r for c, r in base],
        },
    }


def sample(train: Sequence[Example], n: int, seed: int) -> list[Example]:
    """Up to `n` training triples, drawn with the seed, in source order."""
    import random

    pref = [e for e in train if e.kind == "preference"]
    if len(pref) <= n:
        return pref
    keep = set(random.Random(seed).sample(range(len(pref)), n))
    return [e for i, e in enumerate(pref) if i in keep]
