"""`dlm pull BASE`: a base's weights into the local Hugging Face cache, where `dlm train` finds them.

The one command of dlm that uses the network. An alias pulls its hub model; `hf:org/name` and
`org/name` pull that model. A model already in the cache is not fetched again (no network needed);
offline (`HF_HUB_OFFLINE=1`) a missing one is an error that says where to fetch it. Only the files
training reads are fetched (config, safetensors, tokenizer), with huggingface_hub's progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dlm.doc.compat import HUB_PREFIX
from dlm.errors import DlmError, RunError
from dlm.plan.bases import _HUB_ID, ALIASES, cached_snapshot, hub_cache_dir

# Weights in other formats than safetensors, and the original checkpoints some repositories carry.
SKIPPED = ["*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ot", "original/*", "onnx/*"]


@dataclass(frozen=True)
class Pulled:
    hub_id: str
    folder: Path  # the snapshot folder in the cache
    commit: str  # the resolved commit (the snapshot folder's name)
    cached: bool  # True: it was there already, nothing was downloaded


def hub_id_of(base: str) -> str:
    """An alias, `hf:org/name` or `org/name` -> the hub id; anything else is bad input."""
    if base in ALIASES:
        return ALIASES[base].hub_id
    name = base.removeprefix(HUB_PREFIX)
    if not _HUB_ID.match(name):
        raise DlmError(
            f"'{base}' is neither an alias nor a Hugging Face id (org/name)",
            f"aliases: {', '.join(ALIASES)}; a local folder or .gguf file needs no pull",
        )
    return name


def _cached(hub_id: str, revision: str | None) -> Path | None:
    if revision is None:
        return cached_snapshot(hub_id)
    repo = hub_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    return snap if (snap / "config.json").is_file() else None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def pull(base: str, revision: str | None = None) -> Pulled:
    """Fetch `base` into the cache (or find it there); never loads the weights."""
    hub_id = hub_id_of(base)
    snap = _cached(hub_id, revision)
    if snap is not None:
        return Pulled(hub_id, snap, snap.name, cached=True)
    at = f"{hub_id}{'@' + revision if revision else ''}"
    if offline():
        raise RunError(
            f"{at} is not in the local Hugging Face cache ({hub_cache_dir()}), and HF_HUB_OFFLINE is set",
            "run `dlm pull` where the network is allowed (HF_HUB_OFFLINE unset), or point base_model at a "
            "local model folder",
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    try:
        folder = Path(snapshot_download(hub_id, revision=revision, cache_dir=hub_cache_dir(), ignore_patterns=SKIPPED))
    except GatedRepoError:
        raise RunError(
            f"{hub_id} is gated: its license must be accepted on huggingface.co first",
            "accept it on the model's page, then log in (`hf auth login`) and run dlm pull again",
        ) from None
    except RevisionNotFoundError:
        raise DlmError(f"{hub_id} has no revision {revision!r}", "give a branch, tag or commit of the model") from None
    except LocalEntryNotFoundError as exc:
        raise RunError(f"cannot download {at}: {exc}", "check the network connection") from None
    except (HfHubHTTPError, OSError) as exc:
        raise RunError(f"cannot download {at}: {exc}", "check the id, the network and the disk space") from None
    if not (folder / "config.json").is_file():
        raise RunError(f"{at} has no config.json", "dlm trains Hugging Face transformers models")
    return Pulled(hub_id, folder, folder.name, cached=False)
