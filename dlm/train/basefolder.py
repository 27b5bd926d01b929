"""A base's weights as a local folder `from_pretrained` can load: the embedded GGUF (or any `.gguf`
file) converted once under `$DLM_HOME/bases/`, a folder as it is, or a hub cache snapshot.

Never downloads. Heavy imports (transformers) stay inside `convert_gguf`, so importing this module
costs nothing; `dlm train`, `prompt`, `export` and `compare` pay for a conversion once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dlm.errors import DlmError
from dlm.plan.bases import ALIASES, BaseFacts, gguf_of_package, snapshot_or_error
from dlm.store.integrity import sha256_file

_COMPLETE = "dlm-base.json"  # written last into the temp folder: its presence means "fully converted"


def _clear_gguf_quantizer(model: Any) -> None:
    """A GGUF-loaded model keeps the GGUF 'quantizer' marks although its weights are already plain
    float tensors; `save_pretrained` refuses to write it until they are gone."""
    model.hf_quantizer = None
    model.is_quantized = False
    for cfg in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            try:
                delattr(cfg, "quantization_config")
            except AttributeError:
                cfg.quantization_config = None


def convert_gguf(gguf: Path, target: Path, source: str | None = None) -> Path:
    """Dequantise a `.gguf` file into a safetensors + tokenizer folder at `target`, once.

    ~25-30 s for SmolLM2-135M on 2 CPU cores (the GGUF reader is pure Python); afterwards
    `from_pretrained(target)` takes ~1-2 s. Atomic: the folder is built beside `target` and renamed into place, so a reader
    sees nothing or a complete folder. A file lock makes a second process wait for the first
    conversion and then reuse it instead of converting again.
    """
    if (target / _COMPLETE).is_file():
        return target
    import shutil
    import tempfile

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / _COMPLETE).is_file():  # another process finished while we waited
            return target
        if target.exists():  # debris of a foreign or older layout: never trust a folder without the marker
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            # dlm draws its own progress; transformers' tqdm bars would tear through it. The GGUF
            # reader's bar is a bare `tqdm` that ignores the switch, so it is silenced by name.
            import functools

            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers import modeling_gguf_pytorch_utils as gguf_utils
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            gguf_tqdm = getattr(gguf_utils, "tqdm", None)
            if gguf_tqdm is not None:
                gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                _clear_gguf_quantizer(model)
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
            finally:
                if gguf_tqdm is not None:
                    gguf_utils.tqdm = gguf_tqdm
                if bars:
                    hf_logging.enable_progress_bar()
            marker = {"source": source or str(gguf), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}
            (tmp / _COMPLETE).write_text(json.dumps(marker, indent=2) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the converted base is not a secret
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def materialize(facts: BaseFacts, home: Path) -> Path:
    """A local folder (config, safetensors, tokenizer) for `from_pretrained`. Never downloads.

    - the embedded alias: its package's GGUF, converted once into `$home/bases/<alias>/`;
    - a `.gguf` file: converted once into `$home/bases/gguf-<sha256 prefix>/`;
    - a folder: used as is;
    - a hub id or another alias: the local Hugging Face cache snapshot (`HF_HUB_OFFLINE` holds
      trivially: nothing here talks to the network).
    """
    home = Path(home).expanduser()
    if facts.kind == "alias":
        alias = ALIASES[facts.name]
        if alias.gguf_package:
            return convert_gguf(gguf_of_package(alias.gguf_package), home / "bases" / facts.name, alias.hub_id)
        return snapshot_or_error(alias.hub_id, facts.name)
    if facts.kind == "gguf":
        gguf = Path(facts.location)
        if not gguf.is_file():
            raise DlmError(f"base_model file not found: {gguf}", "give the path relative to the document", str(gguf))
        return convert_gguf(gguf, home / "bases" / f"gguf-{sha256_file(gguf)[:16]}")
    if facts.kind == "folder":
        folder = Path(facts.location)
        if not (folder / "config.json").is_file():
            raise DlmError(
                f"{folder} has no config.json", "point base_model at a Hugging Face model folder", str(folder)
            )
        return folder
    return snapshot_or_error(facts.name, facts.name)
