"""A document's runs, end to end: plan -> lock the store -> train -> commit a version; and the current adapter.

The glue between `prepare` (pure), `train` / `infer` (heavy) and `store` (files), shared by
`dlm train`, `dlm prompt`, `dlm show`, `dlm export` and `dlm compare`, so they all agree on which
adapter is current and whether it is stale. Prints nothing: callers pass `on_plan`, `on_step` and
`on_event` and draw with `render.py`.

Policy (docs/cli.md, "train"):
- a blocked plan never trains (RunError, exit 1; `dlm doctor FILE` shows why);
- `--resume` continues the newest interrupted run of the same document text from its newest
  checkpoint; a changed document cannot resume (its checkpoint trained on other rows), nor can a
  run whose base files, plan, world size, device or store format changed since it began (exit 2,
  naming each field; `dlm.store.resume`);
- with neither `--resume` nor `--fresh`, an interrupted run of the same text is not thrown away
  silently: the command stops and asks for one of the two;
- only a finished, finite adapter becomes a version; the `adapter` pointer moves after that;
- a failed disk write becomes one RunError (exit 1) and leaves the store as the last good write did;
- under torchrun / accelerate launch only rank 0 locks and writes the store; the other ranks train
  in lockstep into a private folder (docs/scaling.md). Faults tried: docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle  # only for its exception type: dlm never unpickles
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlm.errors import DlmError, RunError
from dlm.plan.hardware import HardwareFacts
from dlm.plan.prepare import Prepared, prepare
from dlm.store.checkpoints import is_dpo_checkpoint
from dlm.store.current import corpus_sha256, doc_sha256
from dlm.store.opening import open_store
from dlm.store.resume import check_resume, run_shape
from dlm.store.store import Store, store_root


@dataclass(frozen=True)
class Outcome:
    prepared: Prepared
    store: Store
    run_id: str
    version: str | None  # the committed version (status ok), else None
    summary: Any  # train.RunSummary
    resumed_from: str | None = None


def rank() -> int:
    """This process's rank under torchrun / accelerate (0 when alone)."""
    return int(os.environ.get("RANK", "0") or 0)


def _resumable(store: Store, sha: str) -> tuple[dict[str, Any], Path] | None:
    """(run record, checkpoint) of the newest unfinished run, when it trained on this very text."""
    ckpt = store.latest_checkpoint()
    if ckpt is None:
        return None
    record = store.run(ckpt.parent.parent.name)
    return (record, ckpt) if record.get("doc_sha256") == sha else None


def train_document(
    path: str | Path,
    home: Path,
    hardware: HardwareFacts,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    fresh: bool = False,
    on_plan: Callable[[Prepared], None] | None = None,
    on_step: Callable[..., None] | None = None,
    on_event: Callable[[str, dict], None] | None = None,
    seed: int | None = None,
) -> Outcome:
    """Train one document into a new version of its store. Raises DlmError / RunError, never half-commits.

    `seed` (`dlm train --seed`) replaces `training.seed` for this run only, as if the document said
    it: the version's spec.json and summary record it; the held-out split does not depend on it."""
    from dlm.plan.hardware import launch_env, package_versions
    from dlm.train import basefolder

    if resume and fresh:
        raise DlmError("--resume and --fresh contradict each other", "pass one of them")
    world, sharding = launch_env()
    made: list[Path] = []  # the base's folder, kept for the run's shape (a .gguf base is hashed to find it)

    def base_folder(base: Any) -> Path:
        made.append(basefolder.materialize(base, home))
        return made[-1]

    # The base's folder comes first (converting the embedded GGUF once), so the plan counts every
    # example with the base's own tokenizer and sequence_len never cuts one silently.
    prepared = prepare(
        path,
        hardware,
        world_size=world,
        max_steps=max_steps,
        sharding=sharding,
        home=home,
        base_folder=base_folder,
        training_overrides={"seed": seed} if seed is not None else None,
    )
    plan, spec = prepared.plan, prepared.spec
    if plan.blocked:
        codes = ", ".join(f.code for f in plan.findings if f.level == "block")
        raise RunError(
            f"the plan is blocked ({codes}); nothing was trained",
            f"`dlm doctor {path}` shows each finding and its fix",
            prepared.doc.path,
        )
    if on_plan is not None:
        on_plan(prepared)
    sha = doc_sha256(prepared)
    if rank() != 0:
        return _train_other_rank(prepared, home, sha, resume=resume, fresh=fresh, on_step=on_step, on_event=on_event)
    # A full disk or a read-only folder can fail any write from here on (the manifest, a checkpoint,
    # the version): each becomes one clear RunError, and the store stays as the last good write left it.
    with _disk_errors(store_root(home, spec.dlm_id)):
        store = open_store(home, spec.dlm_id, Path(prepared.doc.path), spec.base_model)
        shape = _shape(prepared, home, made[-1] if made else None)
        with store.lock():
            resume_from = _resume_choice(store, sha, prepared, home, resume=resume, fresh=fresh, shape=shape)
            run_id = store.begin_run(sha, spec.training.seed, package_versions(), shape)
            out_dir = store.run_dir(run_id)
            try:
                if resume_from is not None:  # the new run continues the old one's log from its checkpoint
                    _copy_log(resume_from.parent.parent / "log.jsonl", out_dir / "log.jsonl")
                summary = _run(prepared, home, out_dir, resume_from, on_step, on_event, report=True)
            except BaseException as exc:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                _end_quietly(store, run_id, status, None, f"{type(exc).__name__}: {exc}"[:500])
                if resume_from is not None and isinstance(exc, pickle.UnpicklingError):
                    # The Trainer reads optimizer.pt / rng_state.pth with torch.load(weights_only=True):
                    # anything but tensors and plain containers (code, say) is refused, never run.
                    raise RunError(
                        f"checkpoint {resume_from.name} holds more than tensors, so it was refused "
                        "unread (it may have been tampered with)",
                        "train with --fresh to start over; the checkpoint is left as it is for inspection",
                        str(resume_from),
                    ) from exc
                raise
            metrics = _metrics(summary)
            version = None
            if summary.status == "ok":
                adapter = Path(summary.adapter_dir)
                extra = {
                    "run": run_id,
                    "adapter_bytes": sum(p.stat().st_size for p in adapter.glob("*.safetensors")),
                    "doc_sha256": sha,
                    "corpus_sha256": corpus_sha256(prepared),
                    # what `dlm compare` scores this version on; versions without it used the
                    # training seed's draw (corpus.legacy_split)
                    "split": {
                        "rule": "content",
                        "split_seed": spec.training.split_seed,
                        "heldout": [e.id for e in prepared.heldout],
                    },
                    "source": prepared.doc.path,
                    "seed": spec.training.seed,
                    "seed_from": "--seed" if seed is not None else "document",
                    "resumed_from": str(resume_from) if resume_from else None,
                }
                body = {k: v for k, v in summary.to_json().items() if k != "log_history"}
                found, per_triple = split_preference(summary.preference)
                body["preference"] = found
                documents = {
                    "spec": spec.model_dump(mode="json"),
                    "plan": plan.to_json(),
                    "hardware": hardware.to_json(),
                    "summary": {**body, **extra},
                    "metrics": {
                        "dlm_metrics": 1,
                        **metrics,
                        "learning": summary.learning,
                        "preference": found,
                        **({"pref_per_example": per_triple} if per_triple else {}),
                    },
                }
                try:
                    version = store.commit_version(
                        run_id, adapter, {**metrics, "adapter_bytes": extra["adapter_bytes"]}, documents
                    )
                except BaseException as exc:
                    _end_quietly(store, run_id, "failed", metrics, f"saving the version failed: {exc}"[:500])
                    raise
                _prune_checkpoints(store)
            store.end_run(run_id, summary.status, metrics, summary.message or None)
    if summary.status == "failed":
        kept = store.current_version()
        raise RunError(
            f"the run failed: {summary.message}",
            f"the current adapter is unchanged ({kept.name if kept else 'none yet'}); "
            "lower training.learning_rate, or check the data",
            prepared.doc.path,
        )
    return Outcome(prepared, store, run_id, version, summary, str(resume_from) if resume_from else None)


def _resume_choice(
    store: Store,
    sha: str,
    prepared: Prepared,
    home: Path,
    *,
    resume: bool,
    fresh: bool,
    shape: dict[str, Any] | None = None,
) -> Path | None:
    """The checkpoint to continue from (None: start fresh), or the DlmError that asks the user to choose.

    Every rank of a multi-process run calls this on the same store and gets the same answer: rank 0
    before it records its new run, the others read-only; the new run has no checkpoint before all
    ranks train together, so it never changes the answer. A resume is refused (exit 2, nothing
    written) when the run's shape (`_shape`: base files, plan, world size, device, store format)
    changed since the run began, or its checkpoint lacks a rank's RNG state (`store.resume`)."""
    found = _resumable(store, sha)
    if resume and found is None:
        raise DlmError(
            "there is no interrupted run of this document text to resume",
            "train without --resume (a changed document starts over)",
            prepared.doc.path,
        )
    if found is not None and not resume and not fresh:
        record, ckpt = found
        raise DlmError(
            f"run {record['run']} of this document stopped at {ckpt.name}"
            + (" of its DPO phase" if is_dpo_checkpoint(ckpt) else "")
            + " without finishing",
            "pass --resume to continue it, or --fresh to start over",
            prepared.doc.path,
        )
    if not (resume and found):
        return None
    record, ckpt = found
    base_at = prepared.doc.positions.get(("base_model",))
    check_resume(record, shape or _shape(prepared, home), ckpt, prepared.doc.path, base_at)
    return ckpt


def _shape(prepared: Prepared, home: Path, folder: Path | None = None) -> dict[str, Any]:
    """What shapes this run (`store.resume.run_shape`), with the base's files hashed once per state."""
    if folder is None:
        from dlm.train import basefolder

        folder = basefolder.materialize(prepared.base, home)  # made already by `prepare`
    return run_shape(prepared, folder, Path(home).expanduser() / "cache")


def _train_other_rank(
    prepared: Prepared,
    home: Path,
    sha: str,
    *,
    resume: bool,
    fresh: bool,
    on_step: Callable[..., None] | None,
    on_event: Callable[[str, dict], None] | None,
) -> Outcome:
    """A rank other than 0 under torchrun / accelerate launch: train in lockstep, write no store.

    DDP needs every rank in every step, so this rank trains exactly what rank 0 trains (same plan,
    rows and checkpoint) but opens the store read-only and gives the Trainer a private output folder
    (`$DLM_RANK_DIR/rank<N>`, else a temp folder removed afterwards). Rank 0 alone takes the lock,
    records the run and commits the version; its adapter equals this rank's (DDP all-reduces every
    gradient), which tests/test_scale.py checks by keeping `DLM_RANK_DIR`.
    """
    import tempfile

    spec = prepared.spec
    store = open_store(home, spec.dlm_id, Path(prepared.doc.path), spec.base_model, readonly=True)
    resume_from = _resume_choice(store, sha, prepared, home, resume=resume, fresh=fresh)
    keep = os.environ.get("DLM_RANK_DIR")
    if keep:
        out_dir = Path(keep) / f"rank{rank()}"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
    else:
        out_dir = Path(tempfile.mkdtemp(prefix=f"dlm-{spec.dlm_id}-rank{rank()}-"))
    try:
        summary = _run(prepared, home, out_dir, resume_from, on_step, on_event, report=False)
    finally:
        if not keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    return Outcome(prepared, store, "", None, summary, str(resume_from) if resume_from else None)


def _run(
    prepared: Prepared,
    home: Path,
    out_dir: Path,
    resume_from: Path | None,
    on_step: Callable[..., None] | None,
    on_event: Callable[[str, dict], None] | None,
    *,
    report: bool,
) -> Any:
    """`train.run` on the prepared document; only the rank that commits writes the learning report."""
    from dlm.train import basefolder
    from dlm.train import run as train

    spec = prepared.spec
    return train.run(
        prepared.plan,
        prepared.train,
        prepared.heldout,
        basefolder.materialize(prepared.base, home),  # converts under its own file lock, once
        out_dir,
        trust_remote_code=spec.trust_remote_code,
        resume_from=resume_from,
        on_step=on_step,
        on_event=on_event,
        report=spec.training.report if report else 0,
        seed=spec.training.seed,
    )


def _metrics(summary: Any) -> dict[str, Any]:
    keys = (
        "steps",
        "max_steps",
        "train_loss",
        "eval_loss",
        "base_eval_loss",
        "seconds",
        "steady_step_seconds",
        "tokens_seen",
        "peak_memory_bytes",
        "trainable_params",
        "total_params",
    )
    out = {k: getattr(summary, k) for k in keys}
    learning = getattr(summary, "learning", None)
    if learning:  # the learning report's headline figures (the whole report is the version's metrics.json)
        out.update(
            answer_f1=learning["train"]["f1"],
            base_answer_f1=learning["train"]["base_f1"],
            answers_learned=learning["train"]["learned"],
            answers_asked=learning["train"]["n"],
            heldout_answer_f1=learning["heldout"]["f1"],
            base_heldout_answer_f1=learning["heldout"]["base_f1"],
            learning_line=learning["line"],
        )
    out.update(preference_metrics(getattr(summary, "preference", None), getattr(summary, "phases", ())))
    return out


def preference_metrics(found: dict[str, Any] | None, phases: Any = ()) -> dict[str, Any]:
    """objective dpo: the held-out preference figures as top-level metrics (`dlm compare --metric
    pref_accuracy` / `reward_margin`), the training sample's with a `train_` prefix, and each phase."""
    if not found:
        return {}
    out: dict[str, Any] = {}
    for part, prefix in (("heldout", ""), ("train", "train_")):
        for key, value in (found.get(part) or {}).items():
            if key != "per_example":  # the held-out one is metrics.json's `pref_per_example`
                out[prefix + ("pref_n" if key == "n" else key)] = value
    out["phases"] = [{k: v for k, v in p.items() if k != "log"} for p in phases]
    return out


def split_preference(found: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """objective dpo: `preference.measure`'s block without its per-triple lists (the version's
    summary and metrics keep the figures), and the held-out triples' lists alone, for metrics.json's
    `pref_per_example` (`dlm compare`'s paired bootstrap over triples)."""
    if not found:
        return found, None
    parts = {k: v for k, v in found.items() if k not in ("heldout", "train")}
    for part in ("heldout", "train"):
        if isinstance(found.get(part), dict):
            parts[part] = {k: v for k, v in found[part].items() if k != "per_example"}
    return parts, (found.get("heldout") or {}).get("per_example")


def _prune_checkpoints(store: Store) -> None:
    """After a commit no checkpoint can be resumed (resume never reaches past a finished run), so the
    checkpoints of this run and of every earlier interrupted one only take disk: free it."""
    for folder in (store.root / "runs").glob("r*/checkpoints*"):  # checkpoints-dpo: a two-phase run's DPO phase
        shutil.rmtree(folder, ignore_errors=True)


def _copy_log(src: Path, dst: Path) -> None:
    """Carry an interrupted run's log.jsonl into the run that resumes it, without a line cut short by
    a killed process (SIGKILL can land in the middle of a write)."""
    if not src.is_file():
        return
    keep = []
    for line in src.read_text("utf-8", errors="replace").splitlines():
        try:
            if isinstance(json.loads(line), dict):
                keep.append(line)
        except ValueError:
            continue
    dst.write_text("".join(f"{line}\n" for line in keep), encoding="utf-8")


def _end_quietly(store: Store, run_id: str, status: str, metrics: dict[str, Any] | None, message: str) -> None:
    """Record how a run ended while another error is on its way out. If even that write fails (the
    disk is full), the original error matters more: the next `dlm train` marks the run interrupted."""
    try:
        store.end_run(run_id, status, metrics, message)
    except (OSError, RunError):
        pass


# errno values that mean "the disk refused the write", not a bug in dlm
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


@contextlib.contextmanager
def _disk_errors(root: Path) -> Iterator[None]:
    """A failed write (a full disk, a read-only or vanished folder) becomes a RunError with a fix;
    anything else passes through. torch's checkpoint writer reports a full disk as a RuntimeError
    ("... file write failed"), not as an OSError."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
            what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        elif isinstance(exc, RuntimeError) and "write failed" in str(exc):
            what = str(exc).strip().splitlines()[-1]
        else:
            raise
        kept = None
        with contextlib.suppress(RunError, OSError):
            kept = Store(root, root.name, None, None, readonly=True).current_version()
        raise RunError(
            f"a disk write failed, so the run stopped: {what}",
            f"free space (or fix permissions) under {root} and train again; the current adapter "
            f"is unchanged ({kept.name if kept else 'none yet'})",
            str(root),
        ) from exc
