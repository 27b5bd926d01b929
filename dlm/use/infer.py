"""Using a trained adapter: loading it, answering questions and chatting, held-out loss and KL from
the base, merging for export.

The second (and last) module that imports torch/peft/transformers, always inside functions. It
shares `train.rows`' chat rendering and loss masking, so answers and evaluation see exactly what
training saw.

Answering (`dlm prompt`, `dlm chat`) loads only what generation needs: transformers and PEFT, never
trl or datasets, the base in the dtype the adapter was trained in (`trained_load`), with PEFT's optional bitsandbytes import
skipped and idle OpenMP threads sleeping (see `load_trained`'s `lean`). Questions are answered in
batches, left padded; base answers come from the same model with the adapter switched off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm.plan.corpus import Example
from dlm.train.loop import quiet_progress
from dlm.train.rows import FALLBACK_PROMPT, encode_rows, ensure_pad_token, render_chat, rows, torch_dtype

BATCH = 16  # questions per generate call: on 2 CPU cores a batch of 16 costs ~3x one question
# The cached "is bitsandbytes installed?" checks that `_without_bitsandbytes` resets afterwards.
_BNB_CHECKS = (
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
)
CHAT_HELP = "/base (adapter off), /adapter (on), /reset (forget the conversation), /system TEXT, /quit"


@dataclass(frozen=True)
class Loaded:
    """A model ready to answer. `adapter`: the adapter is applied (merged, or switchable when `base` is
    also true); `base`: base answers are available (a plain base, or the adapter switched off)."""

    model: Any
    tokenizer: Any
    adapter: bool
    base: bool


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
    lean: bool = False,
    quantization: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a saved adapter on its base, merged for inference unless `merge=False`.

    The base is never loaded as 4-bit tensors, even for a QLoRA adapter: merging into them would
    round the update away. With `quantization` (the plan's bitsandbytes settings, see
    `trained_load`) its weights are the 4-bit values the adapter was trained against, dequantized to
    `dtype`, the compute dtype (`dequantized_as_trained`), not the originals it never saw (the way
    peft #2105 recommends); without, the saved weights as they are.
    `device` defaults to the GPU when there is one. `lean` is for a process that only generates
    (see `lean_runtime`); `dtype="auto"` keeps the dtype the base was saved in.
    """
    if lean:
        lean_runtime()
    with quiet_progress(datasets=False):
        base, tokenizer = _load_base(base_folder, adapter_dir, trust_remote_code, dtype, device, quantization)
        with _without_bitsandbytes(lean):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(adapter_dir))
        return (merge_for_inference(model) if merge else model.eval()), tokenizer


def trained_load(adapter_dir: Path) -> tuple[str, dict[str, Any] | None]:
    """(dtype, bitsandbytes settings or None) the adapter in `adapter_dir` was trained with, from
    the plan its version recorded (`plan.json`'s model_kwargs); ("auto", None) when none is recorded."""
    import json

    try:
        kwargs = json.loads((Path(adapter_dir) / "plan.json").read_text("utf-8")).get("model_kwargs") or {}
    except (OSError, ValueError, AttributeError):
        return "auto", None
    return str(kwargs.get("dtype") or "auto"), kwargs.get("quantization") or None


def dequantized_as_trained(model: Any, quantization: dict[str, Any]) -> int:
    """Replace, in place, the weight of every linear layer bitsandbytes quantizes on loading (all but
    the output head) with its 4-bit value dequantized: the weights a QLoRA adapter was trained on,
    in full tensors of the model's dtype, so the adapter merges into what it learned against.
    Returns the number of layers changed."""
    import torch
    from bitsandbytes import functional as bnb

    head = model.get_output_embeddings()
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                w = module.weight
                packed, state = bnb.quantize_4bit(
                    w.data.float(),
                    blocksize=64,
                    compress_statistics=bool(quantization.get("bnb_4bit_use_double_quant", False)),
                    quant_type=str(quantization.get("bnb_4bit_quant_type", "fp4")),
                )
                w.copy_(bnb.dequantize_4bit(packed, state).to(w.dtype))
                count += 1
    return count


def load_for_answers(
    adapter_dir: Path,
    base_folder: Path,
    *,
    adapter: bool = True,
    base: bool = False,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> Loaded:
    """The model `dlm prompt` and `dlm chat` answer with, loaded once, in the dtype (and, for QLoRA,
    the dequantized 4-bit weights) the adapter was trained with (`trained_load`).

    Only the adapter's answers: merged for good (it then costs what the base costs per token). Base
    answers too: one PEFT model, merged for the adapter's answers and unmerged with the adapter off
    for the base's (`_side`), never a second load. Only the base's: the base alone, no PEFT at all.
    """
    if not adapter and not base:
        raise ValueError("ask for the adapter's answers, the base's or both")
    dtype, quantization = trained_load(adapter_dir)
    if adapter:
        model, tokenizer = load_trained(
            adapter_dir,
            base_folder,
            trust_remote_code=trust_remote_code,
            merge=not base,
            dtype=dtype,
            device=device,
            lean=True,
            quantization=quantization,
        )
        return Loaded(model, tokenizer, adapter=True, base=base)
    lean_runtime()
    with quiet_progress(datasets=False):
        model, tokenizer = _load_base(base_folder, adapter_dir, trust_remote_code, dtype, device, quantization)
    return Loaded(model.eval(), tokenizer, adapter=False, base=True)


def lean_runtime() -> None:
    """Settings for a process that only generates; they take effect only before torch loads.

    Idle OpenMP threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`, unless the variable is
    set): one decoding step is thousands of small parallel regions, and on cores shared with other
    processes a spinning thread holds the core its partner needs. On 2 shared cores 40 new tokens
    took 18-27 s with libgomp's default (spin, then sleep) and 3-6 s sleeping at once
    (docs/performance.md, "Prompt and chat latency").
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextmanager
def _without_bitsandbytes(lean: bool) -> Iterator[None]:
    """In a lean process, bitsandbytes is "not installed" (None in `sys.modules`) while PEFT is
    imported and wraps the base: PEFT imports it whenever it is installed, and it imports torch's
    compiler, ~1.7 s on 2 cores, for 4-bit layers that a base loaded unquantized never has. After
    the block the libraries' cached answers are cleared, so a later 4-bit load finds it again."""
    if not lean or "peft" in sys.modules or "bitsandbytes" in sys.modules:
        yield
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        for module, name in _BNB_CHECKS:
            getattr(getattr(sys.modules.get(module), name, None), "cache_clear", lambda: None)()


def _load_base(
    base_folder: Path,
    adapter_dir: Path,
    trust_remote_code: bool,
    dtype: str,
    device: str | None,
    quantization: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(base, tokenizer) in `dtype` on `device`; with `quantization` (a QLoRA version's settings) the
    weights are the 4-bit values it trained against, dequantized (`dequantized_as_trained`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # An adapter saved with its own tokenizer grew the vocabulary (an added pad): load that one.
    tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_folder
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
    base = AutoModelForCausalLM.from_pretrained(
        str(base_folder), trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype)
    )
    ensure_pad_token(tokenizer, base)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    base.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if quantization:
        dequantized_as_trained(base, quantization)
    return base, tokenizer


def _sampling(temperature: float) -> dict[str, Any]:
    """generate() kwargs: greedy at 0, else plain sampling (no top-p/top-k from generation_config)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": None, "top_k": None}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def generate_texts(
    model: Any,
    tokenizer: Any,
    heads: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    batch_size: int = BATCH,
) -> list[str]:
    """The continuations of already rendered prompts, in their order. Prompts of similar length share
    a batch, left padded; each row's answer depends on its own prompt only (a greedy answer can
    differ from the one-at-a-time answer only where two tokens tie to float rounding)."""
    import torch

    if not heads:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(heads)), key=lambda i: len(heads[i]))
    texts = [""] * len(heads)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(order), batch_size):
            rows_ = order[start : start + batch_size]
            enc = tokenizer(text=[heads[i] for i in rows_], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    **_sampling(temperature),
                )
            width = enc["input_ids"].shape[1]
            for i, row in zip(rows_, out):
                texts[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return texts


def generate(
    model: Any,
    tokenizer: Any,
    prompt_text: str,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
) -> str:
    """One answer to `prompt_text`, laid out by the chat template as in training. Greedy at 0."""
    head, _ = render_chat(tokenizer, prompt_text, None, system)
    return generate_texts(model, tokenizer, [head], max_new_tokens=max_new_tokens, temperature=temperature)[0]


@contextmanager
def _side(loaded: Loaded, side: str) -> Iterator[None]:
    """The state in which `loaded` answers as `side` ('adapter' or 'base').

    A switchable adapter answers merged into the weights (`merge_adapter`): unmerged, DoRA
    recomputes its weight norms on every token (40 tokens took 8.8 s instead of 3.3 s on the
    embedded base, 2 cores). The base answers unmerged with the adapter off; it is loaded unmerged,
    so base answers asked first (as `dlm prompt --side-by-side` does) see the saved weights
    exactly, and after a merge `unmerge_adapter` subtracts the same update again."""
    model = loaded.model
    if side == "adapter" and loaded.adapter:
        if loaded.base and not _merged(model):
            model.merge_adapter()
        yield
    elif side == "base" and loaded.base and loaded.adapter:
        if _merged(model):
            model.unmerge_adapter()
        with model.disable_adapter():
            yield
    elif side == "base" and loaded.base:
        yield
    else:
        raise ValueError(f"this model was not loaded to answer as {side!r}")


def _merged(model: Any) -> bool:
    return any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters"))


def answer(
    loaded: Loaded,
    questions: Sequence[str],
    system: str | None,
    *,
    sides: Sequence[str] = ("adapter",),
    max_new_tokens: int = 128,
    temperature: float = 0.0,
) -> list[dict[str, str]]:
    """`{"question": q, side: answer, ...}` for every question, in order: each side answers every
    question in batches, through the chat template and system prompt as in training."""
    heads = [render_chat(loaded.tokenizer, q, None, system)[0] for q in questions]
    result = [{"question": q} for q in questions]
    for side in sorted(sides, key=("base", "adapter").index):  # the base first, before any merge
        with _side(loaded, side):
            texts = generate_texts(
                loaded.model, loaded.tokenizer, heads, max_new_tokens=max_new_tokens, temperature=temperature
            )
        for row, text in zip(result, texts):
            row[side] = text
    return result


# --- chat ----------------------------------------------------------------------------------------


@dataclass
class Chat:
    """An interactive session: the model loaded once (adapter switchable), the conversation so far
    (alternating user and assistant messages) and its switches."""

    loaded: Loaded
    system: str | None
    max_new_tokens: int = 128
    temperature: float = 0.0
    adapter: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Turn:
    """What one typed line led to: 'answer' (text is the answer), 'note' (a command's effect),
    'unknown' (a command that does not exist; the session goes on), 'quit' or 'empty'."""

    kind: str
    text: str = ""


def chat_turn(chat: Chat, line: str) -> Turn:
    """Handle one typed line: a slash-command, or a message the model answers with the history."""
    text = line.strip()
    if not text:
        return Turn("empty")
    if not text.startswith("/"):
        return Turn("answer", _reply(chat, text))
    command, _, arg = text.partition(" ")
    if command in ("/quit", "/exit"):
        return Turn("quit")
    if command in ("/base", "/adapter"):
        chat.adapter = command == "/adapter"
        return Turn("note", "adapter on" if chat.adapter else "adapter off: the base answers (/adapter turns it on)")
    if command == "/reset":
        chat.messages.clear()
        return Turn("note", "conversation cleared")
    if command == "/system":
        chat.system = arg.strip() or chat.system
        return Turn("note", f"system prompt: {chat.system or '(none: the template default)'}")
    if command == "/help":
        return Turn("note", CHAT_HELP)
    return Turn("unknown", f"unknown command {command}; commands: {CHAT_HELP}")


def _reply(chat: Chat, text: str) -> str:
    """The answer to `text` after the conversation so far; the history grows only once it is given."""
    loaded = chat.loaded
    messages = [*chat.messages, {"role": "user", "content": text}]
    head = conversation_head(loaded.tokenizer, messages, chat.system)
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    # The oldest exchanges go first when the conversation no longer fits the model's context.
    while limit and len(messages) > 2 and len(loaded.tokenizer(text=head)["input_ids"]) + chat.max_new_tokens > limit:
        messages = messages[2:]
        head = conversation_head(loaded.tokenizer, messages, chat.system)
    with _side(loaded, "adapter" if chat.adapter else "base"):
        (reply,) = generate_texts(
            loaded.model, loaded.tokenizer, [head], max_new_tokens=chat.max_new_tokens, temperature=chat.temperature
        )
    chat.messages = [*messages, {"role": "assistant", "content": reply}]
    return reply


def conversation_head(tokenizer: Any, messages: Sequence[dict[str, str]], system: str | None) -> str:
    """A conversation (alternating user and assistant, ending with the user) laid out for the next
    answer; for a single question exactly `render_chat`'s prompt, as in training."""
    if len(messages) == 1:
        return render_chat(tokenizer, messages[0]["content"], None, system)[0]
    if not getattr(tokenizer, "chat_template", None):
        turns = zip(messages[0::2], messages[1::2])
        done = "".join(FALLBACK_PROMPT.format(prompt=q["content"]) + a["content"] + "\n\n" for q, a in turns)
        return done + FALLBACK_PROMPT.format(prompt=messages[-1]["content"])
    full = ([{"role": "system", "content": system}] if system else []) + list(messages)
    try:
        head = tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
    except Exception:
        if not system:
            raise
        # As render_chat: a template without a system role gets the system text in the first question.
        first = {"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}
        head = tokenizer.apply_chat_template([first, *messages[1:]], tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and head.startswith(bos) and tokenizer(text="x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        head = head[len(bos) :]  # the tokenizer adds BOS itself
    return head


# --- scoring -------------------------------------------------------------------------------------
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

    Each adapter is scored on the base as it was trained (`trained_load`: the dtype of its version's
    plan, and for QLoRA the 4-bit weights dequantized, `dequantized_as_trained`); `dtype` stands in
    for a version that recorded no plan. Adapters trained on one such load share one base load, each
    attached by name (one PeftModel, switched with `set_adapter`; the base runs with adapters
    disabled), so they see the very same token ids, masks and padding. Adapters trained on different
    loads (LoRA in fp32 against QLoRA) are scored group by group, one base load at a time (the
    previous one freed first), each adapter's KL against its own group's base; the "base" row is the
    load of the first adapter. Positions scored: those whose label is not -100, masked exactly as in
    training (`encode_rows`): the answer tokens of instruction rows, every token of prose.

    Returns {"examples": n, "tokens": scored positions, "loss": {"base": x, name: x, ...},
    "delta_kl": {name: x, ...}, "per_example": {"tokens": [...], "loss_sum": {"base": [...], name: [...]},
    "kl_sum": {name: [...]}}, "loads": {name: "float32" | "float32+nf4" | ..., "base": the first's}}
    where loss is the token-weighted mean cross-entropy (as `eval_loss`) and delta_kl the mean over
    the same positions of KL(adapted || base) = sum_v p_adapted(v) * (log p_adapted(v) - log
    p_base(v)), in nats per token. `per_example` has one entry per scored example (rows whose answer
    is cut away entirely score nothing), in order: its scored tokens and its summed loss and KL, for
    compare's paired bootstrap. RunError when two loads tokenize the examples differently.
    """
    examples = list(examples)
    with quiet_progress():
        return _score_adapters(
            Path(base_folder), adapters, examples, max_length, batch_size, trust_remote_code, dtype, device
        )


def load_label(dtype: str, quantization: dict[str, Any] | None) -> str:
    """How a base was loaded, in words for compare: "float32", or "float32+nf4" for QLoRA's
    4-bit weights dequantized to float32."""
    return f"{dtype}+{quantization.get('bnb_4bit_quant_type', 'fp4')}" if quantization else dtype


def _per_row(values: Any, row_of: Any, n: int) -> list[float]:
    """Per-position values summed per batch row (`row_of`: each position's row), as floats."""
    import torch

    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, row_of, values).tolist()


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
    import json

    from dlm.errors import RunError

    names = list(adapters)
    if not names or "base" in names:
        raise ValueError(f"adapter names must be given and must not be 'base': {names}")
    # One group per load the adapters were trained on, in the order of their first adapter (A's first).
    groups: dict[str, tuple[str, dict[str, Any] | None, list[str]]] = {}
    for name in names:
        trained_dtype, quantization = trained_load(adapters[name])
        load = (dtype if trained_dtype == "auto" else trained_dtype, quantization)
        groups.setdefault(json.dumps(load, sort_keys=True), (*load, []))[2].append(name)
    loads = {name: load_label(d, q) for d, q, members in groups.values() for name in members}
    per_tokens: list[int] | None = None
    per_nll: dict[str, list[float]] = {}
    per_kl: dict[str, list[float]] = {}
    for load_dtype, quantization, members in groups.values():
        tokens, nll, kl = _score_group(
            base_folder,
            {n: adapters[n] for n in members},
            examples,
            max_length,
            batch_size,
            trust_remote_code,
            load_dtype,
            quantization,
            device,
        )
        _free()  # the group's model went with the call: one base in memory at a time
        if per_tokens is None:
            per_tokens, per_nll["base"] = tokens, nll["base"]
        elif tokens != per_tokens:
            raise RunError(
                f"{', '.join(members)} ({loads[members[0]]}) and {names[0]} ({loads[names[0]]}) tokenize the "
                "held-out examples differently, so their losses would not be over the same tokens",
                "compare twins whose adapters were trained with the same base and tokenizer",
            )
        per_nll |= {n: nll[n] for n in members}
        per_kl |= kl
    assert per_tokens is not None
    count = sum(per_tokens)
    loads = {"base": loads[names[0]], **loads}
    per_nll = {k: per_nll[k] for k in ("base", *names)}
    per_kl = {k: per_kl[k] for k in names}
    if not count:
        return {
            "examples": len(examples),
            "tokens": 0,
            "loss": dict.fromkeys(per_nll),
            "delta_kl": dict.fromkeys(per_kl),
            "loads": loads,
        }
    # KL is >= 0; a sum of float terms for identical distributions can land a hair below.
    return {
        "examples": len(examples),
        "tokens": count,
        "loss": {k: sum(v) / count for k, v in per_nll.items()},
        "delta_kl": {k: max(0.0, sum(v) / count) for k, v in per_kl.items()},
        "per_example": {"tokens": per_tokens, "loss_sum": per_nll, "kl_sum": per_kl},
        "loads": loads,
    }


def _free() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _score_group(
    base_folder: Path,
    adapters: dict[str, Path],
    examples: list[Example],
    max_length: int | None,
    batch_size: int,
    trust_remote_code: bool,
    dtype: str,
    quantization: dict[str, Any] | None,
    device: str | None,
) -> tuple[list[int], dict[str, list[float]], dict[str, list[float]]]:
    """One base load (`dtype`, dequantized as trained with `quantization`) with `adapters` attached:
    per scored example its scored tokens, and the summed loss of the base and of each adapter, and
    each adapter's summed KL from this base. The model goes with the call (`_free`)."""
    import torch
    from peft import PeftModel

    names = list(adapters)
    # An adapter saved with its own tokenizer grew the vocabulary (an added pad): load that one.
    tok_dir = next((Path(d) for d in adapters.values() if (Path(d) / "tokenizer_config.json").is_file()), base_folder)
    base, tokenizer = _load_base(base_folder, tok_dir, trust_remote_code, dtype, device, quantization)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    dev = next(model.parameters()).device
    enc = encode_rows(rows(examples, tokenizer), tokenizer, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Per scored example, for compare's paired bootstrap: its scored tokens, summed loss and KL.
    per_tokens: list[int] = []
    per_nll: dict[str, list[float]] = {k: [] for k in ("base", *names)}
    per_kl: dict[str, list[float]] = {k: [] for k in names}
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

            row_of = keep.nonzero()[:, 0]  # the batch row of each scored position

            with model.disable_adapter():
                base_lp = log_probs()
            per_nll["base"] += _per_row(-base_lp.gather(1, wanted)[:, 0], row_of, len(batch))
            for name in names:
                model.set_adapter(name)
                lp = log_probs()
                per_nll[name] += _per_row(-lp.gather(1, wanted)[:, 0], row_of, len(batch))
                per_kl[name] += _per_row((lp.exp() * (lp - base_lp)).sum(dim=-1), row_of, len(batch))
            per_tokens += keep.sum(dim=1).tolist()
    return per_tokens, per_nll, per_kl
