"""`dlm export`: the current adapter as a folder people run or publish.

Formats (docs/export.md): `hf`, the adapter merged into its base as a Hugging Face folder; `gguf`,
the merged model as one `.gguf` file (`use.gguf_file`); `ollama`, that file plus a `Modelfile`;
`peft`, the adapter alone as a standard PEFT folder. Every folder gets a model card (`use.cards`).
The merge happens in the dtype the adapter was trained in (a QLoRA adapter into the 4-bit weights
it learned against, dequantized: `infer.trained_load`); `--dtype` casts the merged hf folder after.

Atomic: everything is written into a temp folder beside the target and renamed into place at the
end, so an interrupted export leaves nothing under the final name; a non-empty target is refused
before anything loads. Options that cannot work (a quant the format has no use for, a base GGUF
cannot hold) are refused before the weights load. Heavy imports stay inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm.errors import DlmError
from dlm.plan.bases import ALIASES
from dlm.plan.findings import EXPORT_FORMATS, GGUF_QUANTS, LOSSY_QUANTS, Finding, export_findings
from dlm.store.current import Current
from dlm.train import basefolder
from dlm.use import cards
from dlm.use.infer import load_trained, trained_load

DEFAULT_QUANT = "f16"
GGUF_NAME = "model.gguf"
DTYPES = ("float32", "bfloat16", "float16")
# Files of a version folder that are dlm's records, not part of a PEFT adapter.
_DLM_FILES = {"spec.json", "plan.json", "hardware.json", "summary.json", "metrics.json", "log.jsonl", "files.json"}
AGREEMENT_EXAMPLES = 16  # held-out examples (else training ones) the lossy-quant agreement is measured on


@dataclass
class Exported:
    out_dir: Path
    files: list[str]
    findings: list[Finding] = field(default_factory=list)
    ollama_create: str | None = None
    gguf: dict[str, Any] | None = None


def check_options(fmt: str, quant: str | None, dtype: str | None) -> None:
    """Refuse what cannot work, before anything is read or loaded (exit 2)."""
    if fmt not in EXPORT_FORMATS:
        raise DlmError(
            f"--format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})", "for example: --format gguf"
        )
    if quant is not None and fmt not in ("gguf", "ollama"):
        raise DlmError(f"--quant applies to --format gguf and ollama, not {fmt}", "drop --quant, or use --format gguf")
    if quant is not None and quant not in GGUF_QUANTS:
        raise DlmError(
            f"--quant {quant} is not written here: dlm writes {', '.join(GGUF_QUANTS)} in Python",
            f"export --quant f16, then run llama.cpp's quantizer: llama-quantize model.gguf model-{quant}.gguf "
            f"{quant.upper()}",
        )
    if dtype is not None and fmt != "hf":
        raise DlmError(f"--dtype applies to --format hf, not {fmt}", "drop --dtype (gguf uses --quant)")
    if dtype is not None and dtype not in DTYPES:
        raise DlmError(f"--dtype must be float32, bfloat16 or float16 (got {dtype!r})", "for example: --dtype bfloat16")


def refuse_non_empty(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DlmError(f"{out_dir} exists and is not empty", "choose a new folder for the export", str(out_dir))


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A temp folder beside `out_dir`, renamed to it when the block ends cleanly, removed otherwise."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700; an export is meant to be shared
        refuse_non_empty(out_dir)  # someone may have filled it meanwhile
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def card_facts(cur: Current) -> cards.CardFacts:
    """The model card's facts from the version folder's records (spec, plan, summary, metrics)."""
    spec, summary = cur.prepared.spec, cur.summary
    plan = _read(cur.version_dir / "plan.json")
    metrics = _read(cur.version_dir / "metrics.json")
    alias = ALIASES.get(spec.base_model)
    base = cur.prepared.base
    hub = alias.hub_id if alias else (base.location if base.kind == "hub" else None)
    return cards.CardFacts(
        name=Path(cur.prepared.doc.path).stem,
        source=str(summary.get("source") or cur.prepared.doc.path),
        base_model=spec.base_model,
        base_hub_id=hub,
        adapter=spec.training.adapter,
        version=cur.version_dir.name,
        doc_sha256=str(summary.get("doc_sha256", "")),
        corpus_sha256=str(summary.get("corpus_sha256", "")),
        reason=str(plan.get("reason") or cur.prepared.plan.reason),
        metrics=summary,
        learning=metrics.get("learning"),
        system_prompt=spec.system_prompt,
    )


def document_quant(written: str | None, doc: Any = None) -> str | None:
    """The document's `export.quant` (the original format's names, e.g. Q8_0) as a `--quant` value,
    None when it wrote none. One that is not written in Python here (the k-quants) is refused, before
    anything loads, with the two commands that make it: an f16 export, then llama.cpp's quantizer."""
    if written is None:
        return None
    quant = written.lower()
    if quant in GGUF_QUANTS:
        return quant
    raise DlmError(
        f"export.quant {written} (the document's default) is not written here: dlm writes "
        f"{', '.join(GGUF_QUANTS)} in Python",
        f"pass --quant f16, then run llama.cpp's quantizer: llama-quantize model.gguf model-{written}.gguf {written}",
        *_key_at(doc, ("export", "quant")),
    )


def _key_at(doc: Any, key: tuple[str, ...]) -> tuple[str | None, int | None, int | None]:
    """(path, line, col) of a frontmatter key of `doc`, as far as known."""
    if doc is None:
        return None, None, None
    line, col = doc.positions.get(key) or (None, None)
    return doc.path, line, col


def export(
    cur: Current, home: Path, fmt: str, out_dir: Path, *, quant: str | None = None, dtype: str | None = None
) -> Exported:
    """Write the current adapter of `cur` to `out_dir` in `fmt`; see the module docstring."""
    check_options(fmt, quant, dtype)
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir)
    spec = cur.prepared.spec
    if fmt in ("gguf", "ollama"):
        quant = quant or document_quant(spec.export.quant, cur.prepared.doc) or DEFAULT_QUANT
    before = export_findings(fmt, quant, cur.prepared.base.model_type, spec.training.adapter == "dora")
    blocked = [f for f in before if f.level == "block"]
    if blocked:
        raise DlmError(f"blocked: {blocked[0].code}: {blocked[0].message}", blocked[0].hint)
    facts = card_facts(cur)
    if fmt == "peft":
        with staging(out_dir) as tmp:
            files = _peft_folder(cur.version_dir, tmp, facts.base_hub_id)
            (tmp / "README.md").write_text(cards.model_card(facts, fmt, files), "utf-8")
        return Exported(out_dir, [*files, "README.md"], list(before))

    folder = basefolder.materialize(cur.prepared.base, home)
    if fmt in ("gguf", "ollama"):
        from dlm.use.gguf_file import preflight

        preflight(folder, cur.version_dir, ollama=fmt == "ollama")
    trained_dtype, quantization = trained_load(cur.version_dir)
    model, tokenizer = load_trained(
        cur.version_dir,
        folder,
        trust_remote_code=spec.trust_remote_code,
        dtype=trained_dtype if trained_dtype != "auto" else "float32",  # merged as trained
        device="cpu",  # written to disk anyway; keeps GPU memory free
        quantization=quantization,  # QLoRA: into the dequantized 4-bit weights it learned against
    )
    if dtype is not None:
        from dlm.train.rows import torch_dtype

        model = model.to(torch_dtype(dtype))
    if fmt == "hf":
        with staging(out_dir) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / "README.md").write_text(cards.model_card(facts, fmt, files), "utf-8")
        return Exported(out_dir, [*files, "README.md"], list(before))

    from dlm.use.gguf_file import write_gguf

    assert quant is not None
    findings = list(before)
    if quant in LOSSY_QUANTS:
        agreement = quant_agreement(model, tokenizer, cur, quant)
        findings += export_findings(fmt, quant, cur.prepared.base.model_type, False, agreement)
    eot = cards.end_of_turn_tokens(tokenizer)
    ollama_line = None
    with staging(out_dir) as tmp:
        info = write_gguf(
            model,
            tokenizer,
            tmp / GGUF_NAME,
            quant=quant,
            name=facts.name,
            pre=_source_pre_tokenizer(cur),
            end_of_turn=eot,
        )
        files = [GGUF_NAME]
        extra = f"Run it: `llama-cli -m {GGUF_NAME} -cnv` (llama.cpp)."
        if fmt == "ollama":
            text = cards.modelfile(
                tokenizer, GGUF_NAME, spec.system_prompt, spec.export.temperature or 0.0, spec.export.top_p
            )
            (tmp / "Modelfile").write_text(text, "utf-8")
            files.append("Modelfile")
            ollama_line = f"ollama create {cards.ollama_name(facts.name)} -f {out_dir / 'Modelfile'}"
            name = cards.ollama_name(facts.name)
            extra = f"Run it from this folder: `ollama create {name} -f Modelfile`, then `ollama run {name}`."
        (tmp / "README.md").write_text(cards.model_card(facts, fmt, files, quant=quant, extra=extra), "utf-8")
    return Exported(out_dir, [*files, "README.md"], findings, ollama_line, info)


def export_merged(
    adapter_dir: Path, base_folder: Path, out_dir: Path, *, trust_remote_code: bool = False, dtype: str = "float32"
) -> Path:
    """The adapter merged into its base as a plain Hugging Face folder (model + tokenizer), no card:
    the library call under `--format hf`, for callers that hold an adapter folder and a base."""
    out_dir = Path(out_dir)
    refuse_non_empty(out_dir)
    model, tokenizer = load_trained(
        adapter_dir, base_folder, trust_remote_code=trust_remote_code, dtype=dtype, device="cpu"
    )
    with staging(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out_dir


def quant_agreement(model: Any, tokenizer: Any, cur: Current, quant: str) -> tuple[int, int]:
    """(positions whose greedy next token agrees, positions compared) between the merged model and
    the same model with every weight matrix rounded as `quant` stores it, teacher-forced over the
    held-out examples (training ones when none are held out), as the GGUF file will compute."""
    import copy

    import torch

    from dlm.train.rows import encode_rows, rows
    from dlm.use.gguf_file import roundtrip

    examples = list(cur.prepared.heldout or cur.prepared.train)[:AGREEMENT_EXAMPLES]
    encoded = encode_rows(rows(examples, tokenizer), tokenizer, 512)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(roundtrip(p.detach().float().numpy(), quant)).to(p.dtype))
        same = total = 0
        for row in encoded:
            ids = torch.tensor([row["input_ids"]])
            a = model(input_ids=ids).logits.argmax(-1)
            b = rounded(input_ids=ids).logits.argmax(-1)
            same += int((a == b).sum())
            total += int(a.numel())
    return same, total


def _peft_folder(version_dir: Path, tmp: Path, hub_id: str | None) -> list[str]:
    """The adapter's own files (config, weights, a grown tokenizer) without dlm's records; the
    config names the base by its Hub id where one is known instead of a local folder."""
    files = []
    for p in sorted(version_dir.iterdir()):
        if p.is_file() and p.name not in _DLM_FILES and p.name != "README.md":
            shutil.copy2(p, tmp / p.name)
            files.append(p.name)
    config = tmp / "adapter_config.json"
    if hub_id and config.is_file():
        data = json.loads(config.read_text("utf-8"))
        data["base_model_name_or_path"] = hub_id
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")
    return files


def _source_pre_tokenizer(cur: Current) -> str | None:
    """A base that came from a GGUF file keeps that file's pre-tokenizer name (the converted
    tokenizer.json no longer says which splitting llama.cpp should use)."""
    from dlm.plan.bases import gguf_of_package

    base = cur.prepared.base
    alias = ALIASES.get(base.name)
    path = (
        gguf_of_package(alias.gguf_package)
        if base.kind == "alias" and alias and alias.gguf_package
        else (Path(base.location) if base.kind == "gguf" else None)
    )
    if path is None or not path.is_file():
        return None
    from gguf import GGUFReader

    field_ = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return str(field_.contents()) if field_ is not None else None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
