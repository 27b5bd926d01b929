"""What `--resume` must find unchanged: a run's shape, recorded when the run begins and compared
before one of its checkpoints is continued.

A checkpoint is the middle of one particular run: its optimizer moments, scheduler position, data
order and RNG streams only make sense under the plan that wrote them. The document's text is not the
whole of that plan: the base's files, the machine, the launcher's world size, `data:` files,
`--max-steps` and dlm's own planner all shape it too. So `run_shape` records (JSON, in the run's
manifest record under `shape`):

- `resume_format` and `store_format`: how this record and the store are laid out;
- `processes` (world size, sharding) and the device kind (cpu | cuda | mps);
- the base: its kind, model type and parameter count, and the sha256 of each of its folder's files
  (config, weights, tokenizer), hashed once per file state (`$DLM_HOME/cache/base-digests.json`);
- `corpus_sha256`: every training and held-out row, `data:` files included;
- the plan's decisions and the kwargs that reach PEFT, TRL and `from_pretrained`, without the run's
  mechanics (how often it logs, evaluates or saves; CPU threads and allocator), which change no weight.

`check_resume` raises one DlmError (exit 2) naming each changed field, from what to what, before
anything is written; and refuses a checkpoint that lacks a rank's RNG state (`rng_state.pth`, or
`rng_state_<rank>.pth` for each rank of a multi-process run), since without it the resumed run would
draw other dropout masks than the uninterrupted one; and refuses a two-phase run's DPO checkpoint
when its run lacks the SFT phase's final checkpoint (the DPO phase resumes on that adapter). Library versions are not compared: the
checkpoint's files are read the same way, and `dlm show` lists each run's versions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dlm.errors import DlmError
from dlm.fsutil import atomic_write
from dlm.plan.prepare import Prepared
from dlm.store.checkpoints import is_dpo_checkpoint, sft_final
from dlm.store.current import corpus_sha256
from dlm.store.integrity import sha256_file
from dlm.store.store import STORE_FORMAT

RESUME_FORMAT = 1  # the layout of the `shape` record; a run recorded in another layout is not resumed
DIGESTS = "base-digests.json"  # under $DLM_HOME/cache: {path: {"stat": ..., "sha256": ...}}
# The files of a base folder that `from_pretrained` and the tokenizer read (top level, as HF lays them out).
BASE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".jinja", ".txt", ".py", ".tiktoken")
# Run mechanics: they change when the run logs, evaluates or saves, or how fast a CPU step goes, never a
# weight. `dpo_step_seconds` is the plan's estimate of a DPO step (it follows the core count).
MECHANICS = frozenset(
    {
        "dpo_step_seconds",
        "eval_steps",
        "eval_strategy",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "logging_steps",
        "report_to",
        "per_device_eval_batch_size",
        "cpu_threads",
        "cpu_allocator",
        "threads",
        "malloc",
    }
)
_SHOWN = 6  # differences named in the message; the rest are counted


def run_shape(prepared: Prepared, base_folder: Path, cache: Path | None = None) -> dict[str, Any]:
    """Everything that shapes a run of `prepared`, as JSON (see the module docstring)."""
    plan, base = prepared.plan, prepared.base

    def keep(kwargs: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in kwargs.items() if k not in MECHANICS}

    shape = {
        "resume_format": RESUME_FORMAT,
        "store_format": STORE_FORMAT,
        "processes": {"world_size": plan.world_size, "sharding": plan.sharding},
        "device": prepared.hardware.device,
        "base": {
            "kind": base.kind,
            "model_type": base.model_type,
            "n_params": base.n_params,
            "files": base_files(base_folder, cache),
            # the hub commit a Hugging Face cache snapshot was resolved to (`dlm pull`), else None
            "revision": base_folder.name if base_folder.parent.name == "snapshots" else None,
        },
        "corpus_sha256": corpus_sha256(prepared),
        "decisions": keep({d.key: d.value for d in plan.decisions}),
        "kwargs": {
            "lora": keep(plan.lora_kwargs),
            "sft": keep(plan.sft_kwargs),
            "model": keep(plan.model_kwargs),
            "runtime": keep(plan.runtime_kwargs),
        },
    }
    return json.loads(json.dumps(shape))  # as the manifest will hold it (tuples become lists)


def base_files(folder: Path, cache: Path | None = None) -> dict[str, str]:
    """{file name: sha256} of the base folder's model and tokenizer files.

    A file is hashed again only when its size, mtime or inode changed since it was last hashed
    (`cache`/base-digests.json), so a multi-GB base costs its read once; a file copied back unchanged
    hashes as before."""
    folder = Path(folder)
    names = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(BASE_SUFFIXES)
    )
    known = _read_cache(cache)
    out, changed = {}, False
    for name in names:
        path = (folder / name).resolve()
        st = path.stat()
        stat = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        entry = known.get(str(path))
        if not (isinstance(entry, dict) and entry.get("stat") == stat and isinstance(entry.get("sha256"), str)):
            entry, changed = {"stat": stat, "sha256": sha256_file(path)}, True
            known[str(path)] = entry
        out[name] = entry["sha256"]
    if changed and cache is not None:
        try:
            atomic_write(Path(cache) / DIGESTS, json.dumps(known, indent=1, sort_keys=True) + "\n")
        except OSError:  # a cache that cannot be written costs time next run, nothing else
            pass
    return out


def check_resume(
    run: Mapping[str, Any],
    now: Mapping[str, Any],
    checkpoint: Path,
    source: str,
    base_at: tuple[int, int] | None = None,
) -> None:
    """Refuse (DlmError, exit 2) to continue `checkpoint` of the recorded `run` when the run's shape
    `now` differs from the one it began with, or a rank's RNG state is missing. Reads only.

    `source` is the document's path; `base_at` the (line, col) of its `base_model` key, named when the
    base's files changed."""
    recorded = run.get("shape")
    where = f"{checkpoint.name} of run {run.get('run')}"
    if not isinstance(recorded, dict) or recorded.get("resume_format") != RESUME_FORMAT:
        raise DlmError(
            f"cannot resume {where}: it was begun by a dlm that recorded no run shape (or another "
            "layout of it), so whether the base, plan and machine are unchanged cannot be checked",
            "pass --fresh to start over",
            source,
        )
    found = differences(_without_mechanics(recorded), _without_mechanics(dict(now)))
    if found:
        decided = [d for d in found if d[0].startswith("decisions.")]
        # A changed decision explains the kwargs that follow from it: name the decisions, not both.
        shown = [d for d in found if not d[0].startswith("kwargs.")] if decided else found
        named = "; ".join(f"{_label(k)}: {_value(a)} -> {_value(b)}" for k, a, b in shown[:_SHOWN])
        more = f" (and {len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else ""
        base = any(k.startswith("base.") for k, _, _ in shown)
        line, col = base_at if base and base_at else (None, None)
        raise DlmError(
            f"cannot resume {where}: what shapes the run changed since it began: {named}{more}",
            f"pass --fresh to start over, or undo the change ({_undo(shown)}); `dlm doctor` shows today's plan",
            source,
            line,
            col,
        )
    if is_dpo_checkpoint(checkpoint) and sft_final(checkpoint.parent.parent) is None:
        raise DlmError(
            f"cannot resume {where} (its DPO phase): the run holds no final checkpoint of its SFT phase, "
            "which the DPO phase continues",
            "pass --fresh to start over",
            source,
        )
    world = int(recorded["processes"]["world_size"])
    names = ["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]
    missing = [n for n in names if not (checkpoint / n).is_file()]
    if missing:
        raise DlmError(
            f"cannot resume {where}: it holds no RNG state for {', '.join(missing)}, so the resumed run "
            "would draw other random numbers (dropout masks) than the uninterrupted run",
            "pass --fresh to start over (multi-process checkpoints written before dlm saved every rank's "
            "RNG state lack rng_state_<rank>.pth)",
            source,
        )


def _without_mechanics(shape: dict[str, Any]) -> dict[str, Any]:
    """`shape` without run mechanics, also where a run recorded one before it counted as such."""
    out = dict(shape)
    if isinstance(out.get("decisions"), dict):
        out["decisions"] = {k: v for k, v in out["decisions"].items() if k not in MECHANICS}
    if isinstance(out.get("kwargs"), dict):
        out["kwargs"] = {
            g: {k: v for k, v in kw.items() if k not in MECHANICS} if isinstance(kw, dict) else kw
            for g, kw in out["kwargs"].items()
        }
    return out


def differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs; a key on one side only counts
    as None on the other."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            out += differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
        return out
    return [] if old == new else [(key, old, new)]


def _label(key: str) -> str:
    """A dotted key as the user knows it: `decisions.precision` -> precision, `base.files.x` -> base file x."""
    fixed = {
        "processes.world_size": "world size (processes)",
        "processes.sharding": "sharding",
        "store_format": "store format",
        "resume_format": "resume record format",
        "corpus_sha256": "training rows (sha256 of every example; data: files included)",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("base.files."):
        return f"base file {key[len('base.files.') :]} (sha256)"
    if key.startswith("base."):
        return f"base {key[len('base.') :]}"
    if key.startswith("decisions."):
        return key[len("decisions.") :]
    if key.startswith("kwargs."):
        group, _, name = key[len("kwargs.") :].partition(".")
        return f"{name} ({group} kwargs)"
    return key


def _value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: enough to tell two apart
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _undo(shown: list[tuple[str, Any, Any]]) -> str:
    """How to put the run back as it began, for the fields that changed."""
    ways = []
    for key, old, _ in shown:
        if key == "processes.world_size":
            way = f"launch {old} process(es), as the run began"
        elif key == "device":
            way = f"resume on a {old} machine"
        elif key.startswith("base."):
            way = "put the base's files back as they were"
        elif key == "corpus_sha256":
            way = "restore the data files as they were"
        elif key in ("store_format", "resume_format"):
            way = "resume with the dlm that began the run"
        elif key in ("decisions.steps", "kwargs.sft.max_steps"):
            way = f"the run began with {_value(old)} steps: the same --max-steps, or the same machine"
        else:
            way = "train on the machine and launch the run began with"
        if way not in ways:
            ways.append(way)
    return "; ".join(ways)


def _read_cache(cache: Path | None) -> dict[str, Any]:
    if cache is None:
        return {}
    try:
        data = json.loads((Path(cache) / DIGESTS).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
