"""The frontmatter schema: shape only, no policy.

`Spec` is what a `.dlm` frontmatter (or a standalone `.yaml` spec) may say. Field names are the
YAML keys and, where a library consumes them, that library's argument name too. Validators check a
single field or a tiny local rule; anything that depends on hardware or is a judgement lives in
`plan.py`. `parse_spec` reports every error of a file together, each at its key's own line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dlm.doc.compat import EXPORT_KEYS, ORIGINAL_VERSIONS, translate
from dlm.doc.datafiles import read_doc
from dlm.doc.grammar import Doc
from dlm.doc.sources import add_sources
from dlm.errors import DlmError, DlmErrors

SCHEMA_VERSION = 1

Adapter = Literal["lora", "qlora", "dora"]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adamw_layerwise",
    "adafactor",
]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
_ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class _Frozen(BaseModel):
    # allow_inf_nan=False (found by tests/test_fuzz.py): YAML's .inf / .nan passed every `ge`/`gt`-only
    # bound, so `weight_decay: .inf` or `galore_scale: .inf` was accepted and reached the trainer.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Source(_Frozen):
    """One `training.sources` item: a folder whose files train as prose (`dlm.doc.sources`)."""

    path: str = Field(min_length=1, description="a folder (or file) relative to the document's folder")
    include: str | list[str] = Field("**/*", description="globs of the files to read (relative to path)")
    exclude: str | list[str] = Field(default_factory=list, description="globs of files to leave out; checked first")
    max_files: int | None = Field(None, ge=1, description="read the first N files in sorted order")
    max_bytes_per_file: int | None = Field(None, ge=1, description="skip (and count) larger files")


class Preference(_Frozen):
    """`training.preference:` — the DPO phase's knobs (docs/preference.md)."""

    beta: float = Field(
        0.1, gt=0, le=10, description="strength of the pull toward the reference: higher keeps the adapter closer"
    )
    loss_type: Literal["sigmoid", "ipo", "sigmoid_norm", "hinge"] = Field(
        "sigmoid",
        description="TRL's DPO loss: sigmoid (DPO), ipo, sigmoid_norm (length-normalised DPO) or hinge (SLiC)",
    )
    learning_rate: float = Field(5e-5, gt=0, le=1e-2, description="the DPO phase's peak learning rate")
    num_epochs: float = Field(3, gt=0, le=1000, description="passes over the preference triples")
    reference: Literal["base", "sft"] | None = Field(
        None,
        description="the model the DPO loss compares against: base = the adapter switched off, sft = the SFT "
        "phase's adapter, frozen; unset: sft when the document also has SFT examples, else base",
    )


class Training(_Frozen):
    """`training:` — every knob of the run. Defaults follow PEFT / axolotl / mlx-lm (see docs/format.md)."""

    objective: Literal["sft", "dpo"] = Field(
        "sft",
        description="sft = every example trains as a target (a preference's chosen answer); dpo = preference "
        "triples train with DPO, after an SFT phase on the other examples when there are any",
    )
    preference: Preference = Field(default_factory=Preference, description="the DPO phase's knobs")
    adapter: Adapter = Field("lora", description="the adapter; qlora also loads the base in 4-bit")
    lora_r: int = Field(8, ge=1, le=1024, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    dora_dropout: Literal["branch", "input"] = Field(
        "input",
        description="DoRA with lora_dropout > 0: input = PEFT's form, a second base matmul per adapted "
        "layer; branch = dropout on the low-rank branch only, base output reused (torchtune, mlx-lm)",
    )
    dora_forward: Literal["dlm", "peft"] = Field(
        "dlm",
        description="DoRA's training forward: dlm = dlm's faster one where it applies (branch dropout or "
        "lora_dropout 0; checked against PEFT's before training, PEFT's on a mismatch); peft = PEFT's own, always",
    )
    target_modules: Literal["auto", "all-linear"] | list[str] = Field(
        "all-linear",
        description="the linear layers that get an adapter: all-linear = every linear layer of the blocks "
        "(the default: it learned the fact documents of docs/learning.md), auto = attention projections",
    )
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    optimizer: Optimizer = "adamw_torch"
    galore_rank: Literal["auto"] | int = Field(
        "auto",
        description="GaLore projection rank; auto = half of lora_r, since a rank of lora_r or more projects nothing",
    )
    galore_update_proj_gap: int = Field(200, ge=1, description="steps between GaLore projections")
    galore_scale: float = Field(0.25, gt=0, description="GaLore update scale")
    learning_rate: float = Field(
        1e-3, gt=0, le=1, description="peak learning rate; 1e-3 learned the fact documents of docs/learning.md"
    )
    num_epochs: float = Field(
        3, gt=0, le=10_000, description="passes over the data; unset (and no max_steps): the planner's budget"
    )
    max_steps: int | None = Field(None, ge=1, description="overrides num_epochs when set")
    micro_batch_size: Literal["auto"] | int = Field("auto", description="rows per device per step")
    grad_accum: Literal["auto"] | int = Field("auto", description="micro batches per optimizer step")
    sequence_len: int = Field(2048, ge=16, le=1_048_576)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    packing: bool = False
    lr_scheduler: Scheduler = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(42, ge=0, lt=2**32)
    # The held-out draw is a hash of each example's content salted with this, never with `seed`:
    # documents that differ only in `seed` share their held-out set (docs/compare.md).
    split_seed: int | None = Field(
        None, ge=0, lt=2**32, description="salt of the held-out draw (not the training seed)"
    )
    eval_fraction: float = Field(0.1, ge=0, le=0.9, description="0 disables the held-out set")
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)
    logging_steps: int = Field(1, ge=1)
    report_to: Literal["none", "tensorboard"] = Field(
        "none",
        description="tensorboard: the run's log as TensorBoard event files in runs/rNNNN/logs/ (pip install 'dlm[tensorboard]')",
    )
    sources: list[Source] = Field(default_factory=list, description="folders of files read as prose")
    sources_policy: Literal["strict", "permissive"] = Field(
        "strict", description="strict: sources stay inside the document's folder; permissive: any folder"
    )
    report: int = Field(
        32,
        ge=0,
        le=10_000,
        description="training Q/A pairs answered (with every held-out one) in the learning report after a run; 0 = no report",
    )

    @field_validator("micro_batch_size", "grad_accum", "galore_rank")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one module (or be 'auto' / 'all-linear')")
            bad = [m for m in v if not _MODULE_NAME.match(m)]
            if bad:
                raise ValueError(f"not a module name: {bad[0]!r}")
            if len(set(v)) != len(v):
                raise ValueError("lists a module twice")
        return v


class Export(_Frozen):
    """`export:` — defaults `dlm export` reads for the files it writes (a flag given on the command line wins)."""

    quant: Literal["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"] | None = Field(
        None, description="GGUF quantisation of an exported model"
    )
    temperature: float | None = Field(None, gt=0, le=2, description="sampling temperature of the exported model")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling of the exported model")


class Spec(_Frozen):
    """The whole frontmatter."""

    dlm_id: str = Field(description="ULID minted by `dlm init`; ties the file to its store")
    dlm_version: int = Field(SCHEMA_VERSION, ge=1)
    base_model: str = Field("smollm2-135m", min_length=1, description="alias, hub id, folder or .gguf")
    system_prompt: str | None = None
    trust_remote_code: bool = Field(False, description="run the base's own Python code (off)")
    data: list[str] = Field(default_factory=list, description="extra local data files")
    training: Training = Field(default_factory=Training)
    export: Export = Field(default_factory=Export)

    @field_validator("dlm_id")
    @classmethod
    def _ulid(cls, v: str) -> str:
        if not _ULID.match(v):
            raise ValueError("must be a 26-character ULID (Crockford base32, upper case)")
        return v

    @field_validator("dlm_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        # 2..15: DocumentLanguageModel's versions, which only add keys to 1 (dlm.doc.compat)
        if v > SCHEMA_VERSION and v not in ORIGINAL_VERSIONS:
            raise ValueError(
                f"version {v} is newer than this dlm understands ({SCHEMA_VERSION}, or "
                f"DocumentLanguageModel's {ORIGINAL_VERSIONS[0]}..{ORIGINAL_VERSIONS[-1]})"
            )
        return v


# Names other tools use for our keys: a typo-free foreign name still deserves a pointer.
_SYNONYMS = {
    "rank": "lora_r",
    "r": "lora_r",
    "alpha": "lora_alpha",
    "lr": "learning_rate",
    "epochs": "num_epochs",
    "num_train_epochs": "num_epochs",
    "max_seq_length": "sequence_len",
    "max_length": "sequence_len",
    "seq_len": "sequence_len",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "optim": "optimizer",
    "bf16": "precision",
    "fp16": "precision",
    "use_dora": "adapter",
    "load_in_4bit": "adapter",
    "lora_target_modules": "target_modules",
    "base": "base_model",
    "model": "base_model",
    "warmup_steps": "warmup_ratio",
    "activation_checkpointing": "gradient_checkpointing",
}
_NESTED: dict[str, type[BaseModel]] = {"training": Training, "export": Export, "preference": Preference}
Position = tuple[int, int]


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Spec
    for part in loc[:-1]:
        if part == "sources":
            model = Source
        elif isinstance(part, str) and model in (Spec, Training):
            model = _NESTED.get(part, model)
    return list(model.model_fields)


def _suggest(key: str, loc: tuple[Any, ...]) -> str:
    fields = _fields_at(loc)
    if key in _SYNONYMS and _SYNONYMS[key] in fields:
        target = _SYNONYMS[key]
        if key == "use_dora":
            return "write `adapter: dora` under training:"
        if key == "load_in_4bit":
            return "write `adapter: qlora` under training:"
        return f"did you mean '{target}'?"
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if loc[:-1] == () and key in Training.model_fields:
        return f"'{key}' belongs under training:"
    return "valid keys here: " + ", ".join(fields)


def _locate(loc: tuple[Any, ...], positions: Mapping[tuple, Position]) -> Position:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in positions:
            return positions[tuple(loc[:n])]
    return (1, 1)


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # Pydantic adds the union member it tried ('list[str]', "literal['auto']", 'int') to the loc;
    # keep only real keys and list indexes. Unknown keys are kept as the last part.
    known = (
        set(Spec.model_fields)
        | set(Training.model_fields)
        | set(Export.model_fields)
        | set(Source.model_fields)
        | set(Preference.model_fields)
    )
    kept = [p for p in loc[:-1] if isinstance(p, int) or p in known]
    last = loc[-1] if loc else None
    if last is not None and (isinstance(last, int) or last in known or len(kept) == len(loc) - 1):
        if not (isinstance(last, str) and re.match(r"^(list|literal|int|bool|str|float)\b", last)):
            kept.append(last)
    return tuple(kept)


def _message(err: Mapping[str, Any], key: str) -> tuple[str, str]:
    kind, msg, value = err["type"], err["msg"], err.get("input")
    if kind == "missing":
        return f"missing required key '{key}'", "`dlm init` writes a complete scaffold"
    if kind == "extra_forbidden":
        return f"unknown key '{key}'", ""
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    if key == "dlm_version":
        return f"'{key}': {msg}", _hint_for(key)
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return f"'{key}': {msg} (got {shown})", _hint_for(key)


def _describe(ann: Any) -> str:
    """A type annotation in words: `Literal['auto'] | int` -> "'auto' or an integer"."""
    import types
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return "a list of " + ("names" if args and args[0] is str else "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(ann, str(ann))


def _hint_for(key: str) -> str:
    field = (
        Training.model_fields.get(key)
        or Spec.model_fields.get(key)
        or Export.model_fields.get(key)
        or Preference.model_fields.get(key)
    )
    if key == "dlm_version":
        return (
            f"dlm reads version {SCHEMA_VERSION} and DocumentLanguageModel's {ORIGINAL_VERSIONS[0]} to "
            f"{ORIGINAL_VERSIONS[-1]}: a newer file needs a newer dlm (pip install -U dlm)"
        )
    if field is None:
        return "see docs/format.md"
    desc = f" ({field.description})" if field.description else ""
    return f"expected {_describe(field.annotation)}{desc}; see docs/format.md"


def parse_spec(
    mapping: Mapping[str, Any],
    positions: Mapping[tuple, Position] | None = None,
    path: str | None = None,
) -> Spec:
    """Validate a frontmatter mapping; raise `DlmErrors` with every problem at its own line."""
    positions = positions or {}
    if not isinstance(mapping, Mapping):
        raise DlmError("the frontmatter must be a mapping of keys", "start with `dlm_id: ...`", path, 1, 1)
    written = mapping.get("export")  # DocumentLanguageModel's export names, for the messages
    renamed = {
        ("export", new): old for old, new in EXPORT_KEYS.items() if isinstance(written, Mapping) and old in written
    }
    mapping, positions, errors = translate(mapping, positions, path)
    try:
        spec = Spec.model_validate(dict(mapping))
    except ValidationError as exc:
        raw = [(_clean_loc(tuple(e["loc"])), e) for e in exc.errors()]
        # A union reports each member it tried; when one member got as far as a list item, that
        # item's error is the real one, and the key-level "not 'auto'" noise is dropped.
        deepest = {loc for loc, _ in raw}
        seen: set[tuple] = set()
        for loc, err in raw:
            if loc in seen or any(
                len(o) > len(loc) and o[: len(loc)] == loc and isinstance(o[len(loc)], int) for o in deepest
            ):
                continue
            seen.add(loc)
            key = str(next((p for p in reversed(loc) if isinstance(p, str)), "frontmatter"))
            key = renamed.get(loc, key)
            message, hint = _message(err, key)
            if err["type"] == "extra_forbidden":
                hint = _suggest(key, loc)
            line, col = _locate(loc, positions)
            errors.append(DlmError(message, hint or None, path, line, col))
    if errors:
        errors.sort(key=lambda e: (e.line or 0, e.col or 0))
        raise DlmErrors(errors) from None
    return spec


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the frontmatter, for editor completion (`dlm schema`)."""
    schema = Spec.model_json_schema()
    schema["title"] = "dlm frontmatter"
    schema["$id"] = f"https://dlm.dev/schema/v{SCHEMA_VERSION}.json"
    return schema


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now_ms: int | None = None) -> str:
    """A fresh ULID: 48 bits of milliseconds, then 80 random bits, in Crockford base32."""
    import os
    import time

    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def check_doc(path: str | Path) -> tuple[Doc, Spec | None, list[DlmError]]:
    """Read a document and validate its frontmatter, keeping every YAML, body and schema error."""
    doc = read_doc(path, collect=True)
    errors, spec = list(doc.problems), None
    try:
        doc = add_sources(doc)
    except DlmError as exc:
        errors.append(exc)
    if doc.yaml_ok:
        try:
            spec = parse_spec(doc.frontmatter, doc.positions, doc.path)
        except DlmError as exc:
            errors += exc.errors if isinstance(exc, DlmErrors) else [exc]
    return doc, spec, errors


def raise_all(errors: list[DlmError]) -> None:
    """Raise the errors of one document together, in file order (nothing when there are none)."""
    if errors:
        errors = sorted(errors, key=lambda e: (e.line or 0, e.col or 0))
        raise errors[0] if len(errors) == 1 else DlmErrors(errors)


def load_spec(path: str | Path) -> tuple[Doc, Spec]:
    """Read a document (with its data files) and validate its frontmatter; every error raised together."""
    doc, spec, errors = check_doc(path)
    raise_all(errors)
    assert spec is not None
    return doc, spec
