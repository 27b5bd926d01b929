"""Examples -> TRL rows, through the base's chat template: the one rendering that training,
evaluation, prompting and the learning report share, so each sees exactly what training saw.

Rows: one shape for every example, `{"prompt": str, "completion": str}`, so prose and instruction
examples can share a dataset (TRL decides the shape of a whole dataset from its first row).
Instruction and preference examples are rendered through the base's chat template (their `system`
applied): the prompt ends with the generation prompt and the completion is the answer plus the
template's end-of-turn token. Prose has an empty prompt. TRL's `completion_only_loss` (on by
default for this shape) then masks exactly the prompt tokens: loss on every prose token, on the
answer (and its end-of-turn token) only for instructions. `encode_rows` reproduces TRL's masking
for evaluation; tests check both against TRL's own data preparation.

A multi-turn conversation (a `messages` row with several exchanges) is one row: the template's
rendering of the whole conversation (`dlm.plan.chat.layout`, which the plan's token counts share),
with the loss on every assistant turn (answer and end-of-turn token) and on nothing else. A
prompt/completion row cannot mark several spans, so a set holding a conversation goes to TRL already
tokenized, every row as `{"input_ids", "labels"}` (TRL takes a dataset's shape from its first row
and keeps given labels as they are): single-turn rows then carry exactly the ids and labels TRL
would have made of them, and a set without conversations is handed over as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from dlm.errors import DlmError
from dlm.plan import chat
from dlm.plan.corpus import Example

# Pad candidates that are already special tokens of common vocabularies (SmolLM2 / StarCoder:
# <|endoftext|>, Llama 3: <|finetune_right_pad_id|>, Qwen2: <|endoftext|>): choosing one of them
# keeps the embedding matrix, and so the base weights, untouched.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")
ADDED_PAD = "<|dlm_pad|>"
# Without a chat template (a plain base), questions and answers are laid out like this.
FALLBACK_PROMPT = "### Question\n{prompt}\n\n### Answer\n"

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def torch_dtype(name: Any) -> Any:
    """'bfloat16' / 'bf16' / ... -> torch.bfloat16; 'auto', None and torch dtypes pass through."""
    import torch

    if name is None or name == "auto" or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, _DTYPES.get(name, str(name)), None)  # also 'uint8' (bnb_4bit_quant_storage)
    if not isinstance(dtype, torch.dtype):
        raise DlmError(f"unknown dtype {name!r} in the plan", "use float32, bfloat16 or float16")
    return dtype


def ensure_pad_token(tokenizer: Any, model: Any | None = None) -> str:
    """Give the tokenizer a pad token different from eos; mirror it onto the model's configs.

    SmolLM2 ships pad == eos == <|im_end|>. Padding is masked out of the loss either way, but a
    collator that masks by pad id would then also mask every real end-of-turn token, and the model
    would never learn to stop; a distinct pad removes the trap. An existing special token is
    preferred (no embedding resize, base weights untouched; SmolLM2 gets <|endoftext|>, id 0, which
    its byte-level BPE never produces from text); otherwise one is added and the embeddings grow.
    Returns the pad token.
    """
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        chosen = tokenizer.pad_token
    else:
        vocab = tokenizer.get_vocab()
        template = tokenizer.chat_template or ""  # a token the template writes is not free to pad with
        reserved = {eos, tokenizer.bos_token}
        chosen = next(
            (
                t
                for t in (*PAD_CANDIDATES, tokenizer.unk_token)
                if t and t in vocab and t not in reserved and t not in template
            ),
            None,
        )
        if chosen is None:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD})
            chosen = ADDED_PAD
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        tokenizer.pad_token = chosen
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return chosen


def _bos_prefix(tokenizer: Any) -> str:
    """The BOS text a template writes that the tokenizer also adds on its own (else '')."""
    bos = tokenizer.bos_token
    if not bos:
        return ""
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def render_chat(tokenizer: Any, prompt: str, answer: str | None, system: str | None) -> tuple[str, str]:
    """(prompt text ending with the generation prompt, completion text) through the chat template.

    The completion is whatever the template writes after the prompt for this answer (the answer and
    the end-of-turn token), minus trailing whitespace, so TRL does not append a second eos.
    """
    if not getattr(tokenizer, "chat_template", None):
        return FALLBACK_PROMPT.format(prompt=prompt), answer or ""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    try:
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:
        if not system:
            raise
        # Some templates (Gemma's) refuse a system role: fold the system text into the question.
        messages = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    completion = answer or ""
    if answer is not None:
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
        if full.startswith(head):
            completion = full[len(head) :].rstrip()
    bos = _bos_prefix(tokenizer)
    if bos and head.startswith(bos):  # the tokenizer adds BOS itself; a second one would be trained on
        head = head[len(bos) :]
    return head, completion


def conversation(tokenizer: Any, ex: Example) -> chat.Layout:
    """A multi-turn example as one sequence through the chat template: its text and trained spans."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    pairs = [*ex.history, (ex.prompt, ex.completion)]
    try:
        return chat.layout(
            pairs,
            ex.system,
            render if getattr(tokenizer, "chat_template", None) else None,
            eos=tokenizer.eos_token or "",
            bos_prefix=_bos_prefix(tokenizer),
            fallback=FALLBACK_PROMPT,
        )
    except chat.TemplateMismatch as exc:
        raise DlmError(str(exc), chat.CONTEXT_HINT, ex.source, ex.line, 1) from None


def encode_conversation(tokenizer: Any, layout: chat.Layout) -> dict[str, list[int]]:
    """input_ids of the whole text; labels on the assistant spans only. A span's tokens are found as
    a single-turn row's completion is: from where the tokens of the text before it stop agreeing
    with the whole, up to where the tokens of the text through its end stop agreeing."""
    ids = tokenizer(text=layout.text)["input_ids"]
    labels = [-100] * len(ids)
    for start, end in layout.spans:
        a = _common_prefix(tokenizer(text=layout.text[:start])["input_ids"], ids)
        b = _common_prefix(tokenizer(text=layout.text[:end])["input_ids"], ids)
        labels[a:b] = ids[a:b]
    return {"input_ids": ids, "labels": labels}


def question_head(tokenizer: Any, ex: Example) -> str:
    """The text the model answers `ex.prompt` after, as in training: for a conversation, its earlier
    turns (the document's own answers) and the last question, ending with the generation prompt."""
    if ex.history:
        return conversation(tokenizer, ex).last_head
    return render_chat(tokenizer, ex.prompt, None, ex.system)[0]


def rows(examples: Iterable[Example], tokenizer: Any) -> list[dict[str, Any]]:
    """Examples -> TRL rows: `{"prompt", "completion"}`, or, when the set holds a multi-turn
    conversation, every row tokenized as `{"input_ids", "labels"}` (see the module docstring)."""
    exs = list(examples)
    out: list[dict[str, Any]] = []
    for ex in exs:
        if ex.kind == "prose":
            out.append({"prompt": "", "completion": ex.text})
        elif ex.history:
            out.append(encode_conversation(tokenizer, conversation(tokenizer, ex)))
        else:
            head, completion = render_chat(tokenizer, ex.prompt, ex.completion, ex.system)
            out.append({"prompt": head, "completion": completion})
    if any("input_ids" in r for r in out):
        out = [r if "input_ids" in r else _encode(r, tokenizer) for r in out]
    return out


def encode_rows(
    rows_: Sequence[dict[str, Any]], tokenizer: Any, max_length: int | None = None
) -> list[dict[str, list[int]]]:
    """input_ids and labels exactly as TRL 1.16 prepares prompt/completion rows (eos appended,
    -100 on the common prefix of prompt and prompt+completion, truncation keeping the start,
    fully masked rows dropped); rows already tokenized keep their ids and labels, truncated and
    dropped alike. `tests/test_train.py` and `tests/test_multiturn.py` check it against TRL's own
    preparation."""
    out = []
    for row in rows_:
        enc = row if "input_ids" in row else _encode(row, tokenizer)
        ids, labels = list(enc["input_ids"]), list(enc["labels"])
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        if any(label != -100 for label in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def _encode(row: dict[str, str], tokenizer: Any) -> dict[str, list[int]]:
    """One prompt/completion row as TRL tokenizes and masks it, untruncated."""
    eos = tokenizer.eos_token
    completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
    ids = tokenizer(text=row["prompt"] + completion)["input_ids"]
    n = _common_prefix(tokenizer(text=row["prompt"])["input_ids"], ids)
    return {"input_ids": ids, "labels": [-100] * n + ids[n:]}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
