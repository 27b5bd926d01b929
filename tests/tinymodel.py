"""A tiny random Llama with the real SmolLM2 tokenizer, for integration tests that must not download.

The tokenizer (vocabulary, special tokens, ChatML chat template with its default system prompt) is
the embedded base's own, so label masks and pad/eos choices are tested against what users train on.
Getting it means converting the embedded GGUF once per machine (~25-30 s); the converted base is
cached in `$DLM_TEST_CACHE` (default `<repo>/.dlm-home`, which `make` also uses as DLM_HOME), so
later test sessions pay nothing. The tiny model itself (hidden 64, 2 layers, ~3.2M parameters,
nearly all of them the 49,152 x 64 embedding) is built and saved in well under a second.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def test_cache() -> Path:
    return Path(os.environ.get("DLM_TEST_CACHE") or REPO / ".dlm-home")


test_cache.__test__ = False  # a helper, not a pytest test


def smollm2_base() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors folder (converted once per machine)."""
    from dlm.plan import bases
    from dlm.train import basefolder

    return basefolder.materialize(bases.resolve(bases.DEFAULT_BASE), test_cache())


def tiny_config(**overrides):
    """The tiny Llama shape every integration test uses (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig

    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return LlamaConfig(**{**shape, **overrides})


def tiny_base(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM plus the SmolLM2 tokenizer into `folder`; return it.

    Same seed, same weights: tests that compare two runs build the base once or twice alike.
    """
    import torch
    from transformers import LlamaForCausalLM

    src = smollm2_base()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    cfg = tiny_config(
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,  # as SmolLM2 ships it: pad == eos, which train.load_base must fix
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder))
    return folder
