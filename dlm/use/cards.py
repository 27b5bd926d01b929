"""The text files an export carries beside the weights: the model card (`README.md` with Hub-style
YAML metadata) and Ollama's `Modelfile`. Pure string building from what the store recorded.

Where every field comes from is tabled in docs/export.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

import dlm
from dlm.errors import DlmError

LIBRARY = {"hf": "transformers", "peft": "peft", "gguf": "gguf", "ollama": "gguf"}


@dataclass(frozen=True)
class CardFacts:
    """What the model card states, gathered from the version folder's spec, plan, summary and metrics."""

    name: str  # the document's file stem
    source: str  # the document's path as trained
    base_model: str  # the spec's base_model
    base_hub_id: str | None  # the Hub id behind an alias (None: a local folder or file)
    adapter: str  # lora | dora | qlora
    version: str  # v0001, ...
    doc_sha256: str
    corpus_sha256: str
    reason: str  # the plan's reason line
    metrics: dict[str, Any]  # train_loss, eval_loss, base_eval_loss, steps, ...
    learning: dict[str, Any] | None  # the learning report (held-out answer scores), when one was made
    system_prompt: str | None


_METRIC_KEYS = ("steps", "train_loss", "eval_loss", "base_eval_loss", "tokens_seen", "trainable_params")


def model_card(facts: CardFacts, fmt: str, files: list[str], *, quant: str | None = None, extra: str = "") -> str:
    """README.md: YAML front matter a model hub reads (base_model, library_name, tags) plus dlm's own
    block, then a short human summary and how to run the folder."""
    meta: dict[str, Any] = {
        **({"base_model": facts.base_hub_id} if facts.base_hub_id else {}),
        "library_name": LIBRARY[fmt],
        "pipeline_tag": "text-generation",
        "tags": ["dlm", facts.adapter, *(["gguf"] if fmt in ("gguf", "ollama") else [])],
        "dlm": {
            "dlm_version": dlm.__version__,
            "format": fmt,
            **({"quant": quant} if quant else {}),
            "base_model": facts.base_model,
            "adapter": facts.adapter,
            "adapter_version": facts.version,
            "document": facts.source,
            "document_sha256": facts.doc_sha256,
            "data_sha256": facts.corpus_sha256,
            "reason": facts.reason,
            "metrics": {k: facts.metrics[k] for k in _METRIC_KEYS if facts.metrics.get(k) is not None},
            **({"learning": _learning_scores(facts.learning)} if facts.learning else {}),
        },
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    m = facts.metrics
    lines = [
        f"# {facts.name} ({facts.adapter} on {facts.base_hub_id or facts.base_model})",
        "",
        f"Trained by [dlm](https://pypi.org/project/dlm/) {dlm.__version__} from the document `{facts.source}` "
        f"(adapter {facts.version}); this folder is the `--format {fmt}` export"
        + (f" at `{quant}`" if quant else "")
        + ".",
        "",
        f"- plan: `{facts.reason}`",
    ]
    if m.get("eval_loss") is not None:
        base = f" (base: {m['base_eval_loss']:.4f})" if m.get("base_eval_loss") is not None else ""
        lines.append(f"- held-out loss: {m['eval_loss']:.4f}{base} after {m.get('steps')} steps")
    if m.get("train_loss") is not None:
        lines.append(f"- training loss: {m['train_loss']:.4f}")
    if facts.learning and facts.learning.get("line"):
        lines.append(f"- {facts.learning['line']}")
    if facts.system_prompt:
        lines.append(f"- system prompt used in training: {json.dumps(facts.system_prompt)}")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files) + ".", ""]
    if extra:
        lines += [extra.rstrip(), ""]
    return f"---\n{front}---\n\n" + "\n".join(lines)


def _learning_scores(learning: dict[str, Any]) -> dict[str, Any]:
    """The learning report's numbers (counts, F1, losses, perplexities, its line), without the
    per-question answers it also keeps (those stay in the store's metrics.json)."""
    out: dict[str, Any] = {}
    for key, value in learning.items():
        if isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
        elif isinstance(value, (int, float, str, bool)):
            out[key] = value
    return out


# --- Ollama ----------------------------------------------------------------------------------------

# The ChatML layout (SmolLM2, Qwen2): one block per message, the answer opened at the end. The system
# block comes from .System (the Modelfile's SYSTEM or the request's), so the loop skips system messages.
CHATML_TEMPLATE = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\n"
    '{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)


def chatml_render(system: str | None, messages: list[dict[str, str]]) -> str:
    """What Ollama makes of CHATML_TEMPLATE for a conversation (the same pieces, in Python): the
    tests hold it against the tokenizer's own chat template."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages if m["role"] != "system")
    return head + body + "<|im_start|>assistant\n"


def template_default_system(tokenizer: Any) -> str | None:
    """The system text a ChatML template writes when a conversation has none (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."), so the Modelfile's SYSTEM reproduces training's layout."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    m = re.match(r"(?:.*?)<\|im_start\|>system\n(.*?)<\|im_end\|>", head, re.S)
    return m.group(1) if m else None


def end_of_turn_tokens(tokenizer: Any) -> tuple[str, ...]:
    """Every token that ends an answer: the template's end-of-turn marker and the tokenizer's eos."""
    found = [t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>") if t in (tokenizer.chat_template or "")]
    eos = tokenizer.eos_token
    return tuple(dict.fromkeys([*found, *([eos] if eos else [])]))


def modelfile(
    tokenizer: Any, gguf_name: str, system_prompt: str | None, temperature: float = 0.0, top_p: float | None = None
) -> str:
    """Ollama's Modelfile for the exported GGUF: FROM, TEMPLATE (the training chat layout in Go
    template form), SYSTEM (the document's system prompt, else the template's own default),
    PARAMETER stop for every end-of-turn token, PARAMETER temperature (the document's
    `export.temperature`, else 0: greedy, as `dlm prompt`) and top_p when the document gives one."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        raise DlmError(
            "--format ollama writes a TEMPLATE for ChatML chat templates (SmolLM2, Qwen2); this base's "
            "template is another layout",
            "export --format gguf: the file carries the Jinja chat template in its metadata",
        )
    system = system_prompt if system_prompt is not None else template_default_system(tokenizer)
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{CHATML_TEMPLATE}"""', ""]
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in end_of_turn_tokens(tokenizer)]
    lines.append(f"PARAMETER temperature {temperature:g}")
    if top_p is not None:
        lines.append(f"PARAMETER top_p {top_p:g}")
    return "\n".join(lines) + "\n"


def ollama_name(stem: str) -> str:
    """A model name `ollama create` accepts, from the document's file name."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._") or "dlm-model"
