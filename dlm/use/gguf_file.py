"""One `.gguf` file of a merged Llama-family model, written with the `gguf` package in pure Python.

What llama.cpp (and Ollama, which runs it) needs to run the model as it was trained:

- the weights under GGUF's tensor names (`blk.N.attn_q.weight`, ...). For the `llama` architecture
  llama.cpp applies its rotary embedding to interleaved pairs where Hugging Face rotates the two
  halves of each head, so the rows of q_proj and k_proj are reordered head by head (`_rope_rows`);
  transformers' GGUF reader undoes exactly that. qwen2 keeps the halves layout: no reordering.
- the hyperparameters under `<arch>.*` keys;
- the byte-level BPE tokenizer: every token with its type, the merges, the pre-tokenizer's name,
  bos/eos/pad/unk and end-of-turn ids, whether BOS is added, and the chat template (Jinja) as
  `tokenizer.chat_template`, so the runtime lays out a conversation as training did.

Quantisation: f32, f16 and bf16 are conversions; q8_0 is blockwise 8-bit (32 values and one f16
scale per block), done by `gguf.quants`. 1-D tensors (norms, biases) stay f32, as llama.cpp keeps
them. Anything lower (q4_k_m, ...) is `llama-quantize`'s job, run on the f16 file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from dlm.errors import DlmError
from dlm.plan.findings import GGUF_ARCHS, GGUF_QUANTS

_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


def gguf_tensor_name(hf_name: str) -> str | None:
    """GGUF's name for a Hugging Face Llama/Qwen2/Mistral parameter; None for `lm_head.weight`
    (the caller decides: `output.weight`, or nothing when the embeddings are tied)."""
    if hf_name in _TOP:
        return _TOP[hf_name]
    if hf_name == "lm_head.weight":
        return None
    m = _LAYER_NAME.fullmatch(hf_name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    raise DlmError(
        f"the merged model has a tensor GGUF export does not know: {hf_name}",
        "export --format hf (a Hugging Face folder) and convert it with llama.cpp's convert_hf_to_gguf.py",
    )


def _rope_rows(w: Any, heads: int) -> Any:
    """Reorder each head's rows from halves (HF: [x0..x_{d/2-1} | x_{d/2}..]) to interleaved pairs
    (llama.cpp: [x0, x_{d/2}, x1, x_{d/2+1}, ...]) for q_proj (heads = attention heads) or k_proj
    (heads = key/value heads); works on weights [rows, in] and biases [rows]."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pre_tokenizer_name(tok_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its text splitting before BPE), read off
    tokenizer.json: Llama 3's digit groups of 1-3, Qwen2's single digits with its letter rule,
    SmolLM's single digits before byte level, plain GPT-2 byte level; else llama.cpp's default."""
    text = json.dumps(tok_json.get("pre_tokenizer") or {})
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+" in text and "\\\\p{N}|" in text:
        return "qwen2"
    if '"Digits"' in text and '"individual_digits": true' in text and '"ByteLevel"' in text:
        return "smollm"
    if text.count('"type"') == 1 and '"ByteLevel"' in text:
        return "gpt-2"
    return "default"


def preflight(base_folder: Path, adapter_dir: Path, *, ollama: bool) -> None:
    """Refuse, from the folders' JSON files alone (before any weights load), a base the writer cannot
    hold: rope scaling, a tokenizer that is not byte-level BPE, and for Ollama a template that is
    not ChatML. The writer checks the same again on the loaded model."""
    config = _json(base_folder / "config.json")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None):
        raise DlmError(
            f"GGUF export writes plain rotary embeddings; this base uses rope scaling {rope_type!r}",
            "export --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    tok_dir = adapter_dir if (adapter_dir / "tokenizer.json").is_file() else base_folder
    model = _json(tok_dir / "tokenizer.json").get("model") or {}
    if model and (model.get("type") != "BPE" or model.get("byte_fallback")):
        raise DlmError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""),
            "export --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    if ollama:
        template = _json(tok_dir / "tokenizer_config.json").get("chat_template") or ""
        jinja = tok_dir / "chat_template.jinja"
        template = template if isinstance(template, str) else json.dumps(template)
        template += jinja.read_text("utf-8") if jinja.is_file() else ""
        if "<|im_start|>" not in template:
            raise DlmError(
                "--format ollama writes a TEMPLATE for ChatML chat templates (SmolLM2, Qwen2); this base's "
                "template is another layout (or none)",
                "export --format gguf: the file carries the Jinja chat template in its metadata",
            )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The tokenizer as GGUF fields: tokens (one per embedding row), token types, merges.

    Only byte-level BPE (`tokenizer.ggml.model = gpt2`, what SmolLM2, Qwen2 and Llama 3 use) is
    written; a SentencePiece-style vocabulary is refused with the way out."""
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tok_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise DlmError(
            f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')}"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else ""),
            "export --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in tok_json.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [kinds.get(i, 1 if i in by_id else 5) for i in range(size)]  # NORMAL / UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(tok_json)}


def _encode(data: Any, quant: str) -> tuple[Any, Any]:
    """(array to write, raw GGML type or None) for one float32 tensor at `quant`."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    if data.ndim < 2 or quant == "f32":
        return data.astype(np.float32), None
    if quant == "f16":
        return data.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if quant == "bf16" else GGMLQuantizationType.Q8_0
    if qtype == GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        return data.astype(np.float16), None  # rows that do not split into 32-value blocks: f16, as llama.cpp
    return quants.quantize(data, qtype), qtype


def roundtrip(data: Any, quant: str) -> Any:
    """A float32 tensor as a GGUF reader gets it back after `_encode` at `quant` (float32)."""
    import numpy as np
    from gguf import quants

    array, raw = _encode(np.ascontiguousarray(data, dtype=np.float32), quant)
    return (quants.dequantize(array, raw) if raw is not None else array).astype(np.float32).reshape(data.shape)


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    *,
    quant: str,
    name: str,
    pre: str | None = None,
    end_of_turn: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write the (merged, plain) Hugging Face `model` and its tokenizer to `path` as one GGUF file.

    `pre` overrides the pre-tokenizer name read off tokenizer.json (a base that came from a GGUF
    keeps its file's name); `end_of_turn` are the tokens that end an answer (the first one is
    written as `tokenizer.ggml.eot_token_id`). Returns what was written (tensor count, file type)."""
    import gguf
    import numpy as np
    import torch

    cfg = model.config
    model_type = getattr(cfg, "model_type", "")
    if model_type not in GGUF_ARCHS or quant not in GGUF_QUANTS:
        raise ValueError(f"not exportable here: {model_type}, {quant}")  # refused earlier by the CLI
    arch = GGUF_ARCHS[model_type]
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise DlmError(
            f"GGUF export writes plain rotary embeddings; this model uses rope scaling {rope_type!r}",
            "export --format hf and convert the folder with llama.cpp's convert_hf_to_gguf.py",
        )
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    emb = model.get_input_embeddings().weight
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    tok = tokenizer_metadata(tokenizer, emb.shape[0])

    writer = gguf.GGUFWriter(str(path), arch)
    file_type = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[quant]  # gguf.LlamaFileType
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_file_type(file_type)
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(int(value))
    eot = [tokenizer.convert_tokens_to_ids(t) for t in end_of_turn]
    if eot and eot[0] is not None and eot[0] != tokenizer.unk_token_id:
        writer.add_eot_token_id(int(eot[0]))
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bool(bos is not None and tokenizer(text="x")["input_ids"][:1] == [bos]))
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    count = 0
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            target = gguf_tensor_name(hf_name)
            if target is None:
                if tied or tensor.data_ptr() == emb.data_ptr():
                    continue
                target = "output.weight"
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if arch == "llama" and ".attn_q." in target:
                data = _rope_rows(data, heads)
            elif arch == "llama" and ".attn_k." in target:
                data = _rope_rows(data, kv_heads)
            if not np.isfinite(data).all():
                raise DlmError(f"{hf_name} holds NaN or inf after merging", "train again; the adapter is damaged")
            array, raw = _encode(np.ascontiguousarray(data), quant)
            writer.add_tensor(target, array, raw_dtype=raw)
            count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": count, "file_type": file_type, "quant": quant, "arch": arch, "bytes": path.stat().st_size}


def bits_per_weight(path: Path) -> float:
    """Average stored bits per weight of a GGUF file's tensors (for the docs' size table)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    n = sum(int(math.prod(int(x) for x in t.shape)) for t in reader.tensors)
    return 8 * sum(int(t.n_bytes) for t in reader.tensors) / max(1, n)
