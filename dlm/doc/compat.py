"""Documents written for DocumentLanguageModel (the format `.dlm` comes from), read as ours.

Its `dlm_version` 2..15 only added keys to version 1 (the one rename: `training.dpo` became
`training.preference`), so a document that uses only what dlm supports reads as it is. `translate`
maps the keys whose names differ onto ours before validation, and turns each feature dlm does not
have into an error at its key's line that names the feature and what to do instead. `dlm migrate`
(`dlm.doc.migrate`) makes the same changes in the file. The full table is in docs/format.md,
"Coming from DocumentLanguageModel".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dlm.errors import DlmError

ORIGINAL_VERSIONS = range(2, 16)  # DocumentLanguageModel's schema versions after 1 (its v0.10.0 writes 15)
HUB_PREFIX = "hf:"
EXPORT_KEYS = {"default_quant": "quant", "default_temperature": "temperature", "default_top_p": "top_p"}
OPTIMIZERS = {"adamw_bnb_8bit": "adamw_8bit"}  # the same bitsandbytes 8-bit AdamW, under TRL's name

_ONE_ADAPTER = "dlm trains one adapter per document: put each adapter's sections in a document of its own"
# training keys of that format dlm has no feature for -> what to do instead
REFUSED: dict[str, tuple[str, str]] = {
    "adapters": ("named adapters (training.adapters)", _ONE_ADAPTER + ", with its settings under training:"),
    "gate": ("the learned router over named adapters (training.gate)", _ONE_ADAPTER + "; remove training.gate"),
    "cpt": (
        "the continued-pretraining schedule (training.cpt)",
        "remove it: dlm trains prose with loss on every token already; choose lr_scheduler and warmup_ratio "
        "under training:",
    ),
    "audio": ("audio training (training.audio)", "remove it: dlm trains text only"),
    "cache": (
        "the tokenized-section cache settings (training.cache)",
        "remove it: dlm keeps its own token-count cache, with nothing to set",
    ),
}
Position = tuple[int, int]
ORIGINAL_PREFERENCE = {"enabled", "method", "hyperparams"}  # keys only that format's preference block has
REFERENCES = {"pre_adapter": "sft", "base": "base"}  # its names for the DPO reference -> ours


def translate(
    mapping: Mapping[str, Any], positions: Mapping[tuple, Position], path: str | None
) -> tuple[dict[str, Any], dict[tuple, Position], list[DlmError]]:
    """(mapping, positions) with that format's names mapped onto ours, and an error per refused feature.

    Applied to every frontmatter: the names it maps are not ours, so nothing of our own changes."""
    out, pos, errors = dict(mapping), dict(positions), []
    base = out.get("base_model")
    if isinstance(base, str) and base.startswith(HUB_PREFIX):
        out["base_model"] = base[len(HUB_PREFIX) :]
    export = out.get("export")
    if isinstance(export, Mapping):
        renamed = {}
        for key, value in export.items():
            new = EXPORT_KEYS.get(key, key) if EXPORT_KEYS.get(key) not in export else key
            renamed[new] = value
            if ("export", key) in pos:
                pos[("export", new)] = pos[("export", key)]
        out["export"] = renamed
    training = out.get("training")
    if isinstance(training, Mapping):
        t = dict(training)
        for key, (feature, instead) in REFUSED.items():
            if key in t:
                line, col = pos.get(("training", key)) or pos.get(("training",)) or (1, 1)
                errors.append(DlmError(f"not supported by dlm: {feature}", instead, path, line, col))
                del t[key]
        if "dpo" in t:  # the preference block under its old name
            if "preference" in t:
                line, col = pos.get(("training", "dpo")) or (1, 1)
                errors.append(
                    DlmError(
                        "training.dpo and training.preference are one block under two names",
                        "keep training.preference (dpo is its old name)",
                        path,
                        line,
                        col,
                    )
                )
            else:
                t["preference"] = t["dpo"]
                _move(pos, ("training", "dpo"), ("training", "preference"))
            del t["dpo"]
        if isinstance(t.get("preference"), Mapping) and _original_preference(t["preference"]):
            _preference(t, pos, path, errors)
        if isinstance(t.get("optimizer"), str) and t["optimizer"] in OPTIMIZERS:
            t["optimizer"] = OPTIMIZERS[t["optimizer"]]
        if "precision" in t and t["precision"] is None:
            t["precision"] = "auto"  # that format's null: let the planner pick
        out["training"] = t
    return out, pos, errors


def _original_preference(block: Mapping[str, Any]) -> bool:
    return bool(ORIGINAL_PREFERENCE & set(block)) or block.get("reference") == "pre_adapter"


def _move(pos: dict[tuple, Position], old: tuple, new: tuple) -> None:
    """Positions under `old` re-keyed under `new` (a block that moved or was renamed)."""
    for key in [k for k in pos if k[: len(old)] == old]:
        pos[new + key[len(old) :]] = pos[key]


def _preference(t: dict[str, Any], pos: dict[tuple, Position], path: str | None, errors: list[DlmError]) -> None:
    """That format's preference block (`enabled`, `method`, `hyperparams{beta, alpha, learning_rate,
    num_epochs}`, `loss_type`, `reference: base | pre_adapter`) as dlm's `objective: dpo` +
    `training.preference`. ORPO is refused; `enabled: false` drops the block (no DPO phase)."""
    block, out = dict(t["preference"]), {}
    where = pos.get(("training", "preference")) or (1, 1)
    if block.get("method", "dpo") != "dpo":
        errors.append(
            DlmError(
                f"not supported by dlm: training.preference.method: {block['method']} (dlm trains DPO only)",
                "write method: dpo (or remove the key), or remove the preference block",
                path,
                *where,
            )
        )
        del t["preference"]
        return
    if block.get("enabled") is False:
        del t["preference"]
        return
    raw = block.get("hyperparams")
    hyper: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    for key in ("beta", "learning_rate", "num_epochs"):
        if key in hyper:
            out[key] = hyper[key]
            _move(pos, ("training", "preference", "hyperparams", key), ("training", "preference", key))
    for key, value in block.items():
        if key in ("enabled", "method", "hyperparams"):
            continue
        out[key] = REFERENCES.get(value, value) if key == "reference" else value
    t["preference"] = out
    t.setdefault("objective", "dpo")


def version_note(version: int) -> str:
    return f"written for DocumentLanguageModel (dlm_version {version}); read as dlm's format 1"
