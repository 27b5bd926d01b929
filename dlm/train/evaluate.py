"""Held-out loss, masked exactly as training masks it: the figure `train` reports after a run and
`compare` judges on. Torch inside the function only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dlm.plan.corpus import Example
from dlm.train.rows import encode_rows, rows


def eval_loss(
    model: Any, tokenizer: Any, examples: Iterable[Example], *, max_length: int | None = None, batch_size: int = 4
) -> float | None:
    """Mean loss per answer token (prose: per token; a conversation: every assistant turn's tokens)
    over held-out examples, masked as in training.

    Token-weighted over the whole set (not a mean of batch means), so base, A and B are judged on the
    same tokens with the same weights. None when there is nothing to score.
    """
    import torch

    enc = encode_rows(rows(examples, tokenizer), tokenizer, max_length)
    if not enc:
        return None
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(enc), batch_size):
                batch = enc[i : i + batch_size]
                width = max(len(r["input_ids"]) for r in batch)
                ids = torch.tensor(
                    [r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in batch], device=device
                )
                labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch], device=device)
                mask = torch.tensor(
                    [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch], device=device
                )
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                target = labels[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
                )
                total += float(loss)
                count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total / count if count else None
