"""Using a trained adapter: held-out loss, KL from the base, merging, generating, exporting.

The second (and last) module that imports torch/peft/transformers, always inside functions. It
shares `train.py`'s row rendering and loss masking, so evaluation sees exactly what training saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dlm.plan.corpus import Example
from dlm.train.loop import quiet_progress
from dlm.train.rows import encode_rows, ensure_pad_token, render_chat, rows, torch_dtype


def merge_for_inference(model: Any) -> Any:
    """Fold a PEFT adapter (LoRA or DoRA) into the base weights in memory; a plain model passes.

    Unmerged DoRA recomputes weight norms on every token; merged, it costs what the base costs.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def load_trained(
    adapter_dir: Path,
    base_folder: Path,
    *,
    trust_remote_code: bool = False,
    merge: bool = True,
    dtype: str = "float32",
    device: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a saved adapter on its base, merged for inference unless `merge=False`.

    The base is loaded unquantized even for a QLoRA adapter: merging into 4-bit weights would round
    the update away, and inference on the full-precision base is what export writes anyway.
    `device` defaults to the GPU when there is one.
    """
    with quiet_progress():
        return _load_trained(adapter_dir, base_folder, trust_remote_code, merge, dtype, device)


def _load_trained(
    adapter_dir: Path, base_folder: Path, trust_remote_code: bool, merge: bool, dtype: str, device: str | None
) -> tuple[Any, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_folder
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(
        str(base_folder), trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype)
    )
    ensure_pad_token(tokenizer, base)
    base.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return (merge_for_inference(model) if merge else model.eval()), tokenizer


def generate(
    model: Any,
    tokenizer: Any,
    prompt_text: str,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
) -> str:
    """One answer to `prompt_text`, laid out by the chat template as in training. Greedy at 0."""
    import torch

    head, _ = render_chat(tokenizer, prompt_text, None, system)
    enc = tokenizer(text=head, return_tensors="pt").to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            top_p=None,
            top_k=None,
            **sampling,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def score_adapters(
    base_folder: Path,
    adapters: dict[str, Path],
    examples: Iterable[Example],
    *,
    max_length: int | None = None,
    batch_size: int = 4,
    trust_remote_code: bool = False,
    dtype: str = "float32",
    device: str | None = None,
) -> dict[str, Any]:
    """Score the base and every adapter on one set of examples, for `dlm compare`.

    The base is loaded once and each adapter is attached to it by name (one PeftModel, switched with
    `set_adapter`; the base row runs with adapters disabled), so all models see the very same token
    ids, masks and padding. Positions scored: those whose label is not -100, masked exactly as in
    training (`encode_rows`): the answer tokens of instruction rows, every token of prose.

    Returns {"examples": n, "tokens": scored positions, "loss": {"base": x, name: x, ...},
    "delta_kl": {name: x, ...}} where loss is the token-weighted mean cross-entropy (as `eval_loss`)
    and delta_kl the mean over the same positions of KL(adapted || base) =
    sum_v p_adapted(v) * (log p_adapted(v) - log p_base(v)), in nats per token.
    """
    examples = list(examples)
    with quiet_progress():
        return _score_adapters(
            Path(base_folder), adapters, examples, max_length, batch_size, trust_remote_code, dtype, device
        )


def _score_adapters(
    base_folder: Path,
    adapters: dict[str, Path],
    examples: list[Example],
    max_length: int | None,
    batch_size: int,
    trust_remote_code: bool,
    dtype: str,
    device: str | None,
) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(adapters)
    if not names or "base" in names:
        raise ValueError(f"adapter names must be given and must not be 'base': {names}")
    # An adapter saved with its own tokenizer grew the vocabulary (an added pad): load that one.
    tok_dir = next((Path(d) for d in adapters.values() if (Path(d) / "tokenizer_config.json").is_file()), base_folder)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(
        str(base_folder), trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype)
    )
    ensure_pad_token(tokenizer, base)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    base.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    dev = next(model.parameters()).device
    enc = encode_rows(rows(examples, tokenizer), tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = dict.fromkeys(["base", *names], 0.0)
    kl = dict.fromkeys(names, 0.0)
    count = 0
    with torch.no_grad():
        for i in range(0, len(enc), batch_size):
            batch = enc[i : i + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch], device=dev)
            mask = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch], device=dev
            )
            labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch], device=dev)
            target = labels[:, 1:]
            keep = target != -100
            wanted = target[keep][:, None]

            def log_probs() -> Any:
                # Only the scored positions: [tokens, vocab] instead of [batch, width, vocab].
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()  # noqa: B023 - called in this iteration
                return torch.log_softmax(logits, dim=-1)

            with model.disable_adapter():
                base_lp = log_probs()
            nll["base"] -= float(base_lp.gather(1, wanted).sum())
            for name in names:
                model.set_adapter(name)
                lp = log_probs()
                nll[name] -= float(lp.gather(1, wanted).sum())
                kl[name] += float((lp.exp() * (lp - base_lp)).sum())
            count += int(keep.sum())
    if not count:
        return {"examples": len(examples), "tokens": 0, "loss": dict.fromkeys(nll), "delta_kl": dict.fromkeys(kl)}
    # KL is >= 0; a sum of float terms for identical distributions can land a hair below.
    return {
        "examples": len(examples),
        "tokens": count,
        "loss": {k: v / count for k, v in nll.items()},
        "delta_kl": {k: max(0.0, v / count) for k, v in kl.items()},
    }
