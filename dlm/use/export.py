"""`dlm export`: the adapter merged into its base, written as a standard Hugging Face folder.

Atomic: built in a temp folder beside the target and renamed into place; a non-empty target is
refused. Heavy imports stay inside `dlm.use.infer.load_trained`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dlm.errors import DlmError
from dlm.use.infer import load_trained


def export_merged(
    adapter_dir: Path, base_folder: Path, out_dir: Path, *, trust_remote_code: bool = False, dtype: str = "float32"
) -> Path:
    """Merge the adapter into its base and write a standard Hugging Face folder (model + tokenizer).

    Written into a temp folder beside `out_dir` and renamed into place; an existing non-empty
    `out_dir` is refused rather than overwritten.
    """
    import tempfile

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DlmError(f"{out_dir} exists and is not empty", "choose a new folder for the export", str(out_dir))
    model, tokenizer = load_trained(
        adapter_dir, base_folder, trust_remote_code=trust_remote_code, dtype=dtype, device="cpu"
    )  # written to disk anyway; keeps GPU memory free
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
