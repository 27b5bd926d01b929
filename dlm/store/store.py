"""The store of one document, `$DLM_HOME/store/<dlm_id>/`: manifest, versions, the `adapter` pointer, the lock.

Layout and guarantees are documented in docs/store.md. In short: every JSON file is written to a
temp file in its own folder, fsynced and renamed over the old one; a version folder is assembled
beside `versions/`, checked (complete, finite safetensors; sha256 of every file in `files.json`)
and renamed into place whole; only then does `adapter` move, by renaming a fresh symlink over it.
Mutations happen under the store's lock (`with store.lock(): ...`), held by rank 0 only; other
ranks and readers open the store with `readonly=True`. JSON everywhere, never pickle.

This module owns the `Store` class; `opening` finds or creates a store and refuses a second document
claiming its id, `assembly` builds a version folder, `durable` writes JSON, `checkpoints` picks the
checkpoint a resume starts from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from dlm.errors import DlmError, RunError
from dlm.store import durable
from dlm.store.assembly import assemble_version, check_staged
from dlm.store.checkpoints import resume_point
from dlm.store.integrity import CHECKSUMS, verify

STORE_FORMAT = 1  # bumped only with a migration; a newer store is refused, never half-read
MANIFEST, POINTER = "manifest.json", "adapter"
ENDED = ("ok", "failed", "interrupted")
_SAFE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")  # ULIDs and run ids; never a path
_VERSION = re.compile(r"v\d{4,}")


def store_root(home: Path, dlm_id: str) -> Path:
    """`home/store/<dlm_id>`; an id that could escape that folder is refused."""
    if not _SAFE_ID.fullmatch(dlm_id):
        raise DlmError(f"dlm_id {dlm_id!r} cannot name a store folder", "`dlm init` mints a valid one (a ULID)")
    return Path(home) / "store" / dlm_id


# ---------------------------------------------------------------- the store


class Store:
    """One document's store. Build it with `open_store`; mutate it only inside `with store.lock():`."""

    def __init__(self, root: Path, dlm_id: str, source: Path | None, base: str | None, readonly: bool = False):
        self.root, self.dlm_id, self.source, self.base, self.readonly = Path(root), dlm_id, source, base, readonly
        self._locked = False
        self._mine: set[str] = set()  # runs begun through this object: alive, whatever the manifest says

    # -- reading

    def load_manifest(self) -> dict[str, Any]:
        """The manifest as written; a fresh one when the store is empty; RunError when it is damaged."""
        path = self.root / MANIFEST
        hint = (
            f"the adapters under {self.root / 'versions'} are intact; restore {MANIFEST} from a backup, "
            f"or move the folder aside (mv {self.root} {self.root}.damaged) and train again"
        )
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            if self.versions():
                raise RunError(f"the store's {MANIFEST} is missing", hint, str(path)) from None
            return self._fresh()
        except (OSError, UnicodeDecodeError) as exc:
            raise RunError(f"the store's {MANIFEST} cannot be read ({exc})", hint, str(path)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunError(
                f"the store's manifest is damaged (truncated or edited): {exc.msg}",
                hint,
                str(path),
                exc.lineno,
                exc.colno,
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or data.get("dlm_id") != self.dlm_id:
            raise RunError(f"the store's manifest is not the manifest of dlm_id {self.dlm_id}", hint, str(path))
        if int(data.get("store_format", 1)) > STORE_FORMAT:
            raise RunError("this store was written by a newer dlm", "upgrade dlm", str(path))
        return data

    def versions(self) -> list[Path]:
        """Complete version folders, oldest first (assembly folders `.vNNNN.tmp` are not versions)."""
        folder = self.root / "versions"
        found = [p for p in folder.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)] if folder.is_dir() else []
        return sorted(found, key=lambda p: int(p.name[1:]))

    def current_version(self) -> Path | None:
        """The folder `adapter` points at (the manifest's `current` when there is no pointer), or None."""
        link = self.root / POINTER
        target: str | None
        if link.is_symlink():
            target = os.readlink(link)
        elif link.is_file():  # the pointer-file fallback
            target = link.read_text("utf-8").strip()
        else:
            current = self.load_manifest().get("current")
            target = f"versions/{current}" if current else None
        if target is None:
            return None
        folder = self.root / target
        if not re.fullmatch(r"versions/v\d{4,}", target) or not folder.is_dir():
            raise RunError(
                f"the current adapter points at {target!r}, which is not a version",
                "`dlm train` writes a new version",
                str(link),
            )
        return folder

    def run_dir(self, run_id: str) -> Path:
        """`runs/<run_id>/`: the trainer's output folder (checkpoints/ for resume, log.jsonl)."""
        if not _SAFE_ID.fullmatch(run_id):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.root / "runs" / run_id

    def run(self, run_id: str) -> dict[str, Any]:
        return _find_run(self.load_manifest(), run_id)

    def latest_checkpoint(self) -> Path | None:
        """For --resume: the newest complete `checkpoint-N` of the newest unfinished run, or None.

        Runs are walked newest first; one that finished (status ok, or a committed version) ends the
        search, since resuming anything older would undo it. Within a run, `checkpoints.resume_point`
        skips a save cut short (no complete `trainer_state.json`) and puts a two-phase run's DPO
        checkpoints (`checkpoints-dpo/`) before its SFT ones.
        """
        for run in reversed(self.load_manifest()["runs"]):
            if run.get("status") == "ok" or run.get("version"):
                return None
            found = resume_point(self.run_dir(run["run"]))
            if found is not None:
                return found
        return None

    # -- locking

    @contextlib.contextmanager
    def lock(self) -> Iterator[Store]:
        """Hold the store's lock (non-blocking); RunError naming the holder's pid when it is taken."""
        self._writable()
        self.root.mkdir(parents=True, exist_ok=True)
        lock, pidfile = FileLock(str(self.root / ".lock"), timeout=0), self.root / ".lock.pid"
        try:
            lock.acquire()
        except Timeout:
            try:
                pid = str(int(pidfile.read_text().strip()))
            except (OSError, ValueError):  # the holder has not written it yet
                pid = "unknown"
            stop = f", or stop it (kill -INT {pid} saves a checkpoint for --resume)" if pid != "unknown" else ""
            raise RunError(
                f"another dlm train is running on this document (pid {pid})",
                f"wait for it to finish{stop}; the lock is {self.root / '.lock'}",
                str(self.source or self.root),
            ) from None
        try:
            pidfile.write_text(f"{os.getpid()}\n")
            self._locked = True
            self._reconcile()
            yield self
        finally:
            self._locked = False
            pidfile.unlink(missing_ok=True)
            lock.release()

    def _reconcile(self) -> None:
        """Under a fresh lock: finish what a crashed process left half done."""
        for leftover in [*self.root.glob(f".{MANIFEST}.*.tmp"), self.root / f"{POINTER}.tmp"]:
            leftover.unlink(missing_ok=True)
        for partial in (self.root / "versions").glob(".v*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)
        for partial in (self.root / "runs").glob("r*/.adapter.*.tmp"):  # a save cut short (train._save_adapter)
            shutil.rmtree(partial, ignore_errors=True)
        link, pointed = self.root / POINTER, None
        if link.is_symlink() or link.is_file():
            with contextlib.suppress(RunError):  # a dangling pointer must not stop the next train fixing it
                pointed = self.current_version()
        manifest = self.load_manifest()
        recorded = {r.get("version") for r in manifest["runs"]}
        lost: dict[str, str] = {}  # version -> run: committed, but the process died before the manifest said so
        for folder in self.versions():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                owner = json.loads((folder / CHECKSUMS).read_text("utf-8"))["run"]
                if folder.name not in recorded and any(r["run"] == owner for r in manifest["runs"]):
                    lost[folder.name] = owner
        # A commit goes version folder -> pointer -> manifest. A lost version newer than the pointer
        # died before the pointer moved: it is complete (files.json is written last), so finish the
        # commit: verify it and point at it. An older lost one is only recorded, never made current.
        newest = max(lost, key=lambda v: int(v[1:]), default=None)
        if newest is not None and (pointed is None or int(newest[1:]) > int(pointed.name[1:])):
            with contextlib.suppress(RunError, OSError):
                verify(self.root / "versions" / newest)
                self._point(newest)
                pointed = self.root / "versions" / newest

        def fix(m: dict[str, Any]) -> None:
            for run in m["runs"]:
                if run["status"] == "running" and run["run"] not in self._mine:  # we hold the lock: it died
                    run["status"] = "interrupted"
            for name, owner in lost.items():
                run = _find_run(m, owner)
                run["version"] = name
                if run["status"] in ("running", "interrupted"):  # it trained and saved; only end_run was lost
                    run.update(
                        status="ok", message=f"recorded after a restart: the process stopped after committing {name}"
                    )
            if pointed is not None:
                m["current"] = pointed.name
            if self.source is not None:
                m["source"] = str(self.source)  # a moved document is adopted (open_store ruled out a twin)

        self._update(fix)

    # -- writing (under the lock)

    def begin_run(
        self,
        doc_sha256: str,
        seed: int | None,
        versions: Mapping[str, str | None],
        shape: Mapping[str, Any] | None = None,
    ) -> str:
        """Record a new run (status running), create `runs/<id>/`, return its id (r0001, r0002, ...).

        `shape` (`dlm.store.resume.run_shape`) is what a later `--resume` of this run's checkpoints
        must find unchanged."""
        self._need_lock()

        def add(m: dict[str, Any]) -> str:
            used = [int(r["run"][1:]) for r in m["runs"] if re.fullmatch(r"r\d+", r["run"])]
            used += [int(p.name[1:]) for p in (self.root / "runs").glob("r*") if p.name[1:].isdigit()]
            run_id = f"r{max(used, default=0) + 1:04d}"
            m["runs"].append(
                {
                    "run": run_id,
                    "version": None,
                    "status": "running",
                    "started": durable.now_iso(),
                    "ended": None,
                    "doc_sha256": doc_sha256,
                    "base": self.base,
                    "seed": seed,
                    "metrics": {},
                    "versions": dict(versions),
                    "message": None,
                    **({"shape": dict(shape)} if shape is not None else {}),
                }
            )
            return run_id

        run_id = self._update(add)
        self._mine.add(run_id)
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        return run_id

    def commit_version(
        self, run_id: str, staged_dir: Path, metrics: Mapping[str, Any], documents: Mapping[str, Any] | None = None
    ) -> str:
        """Check, move and record `staged_dir` as the next version; point `adapter` at it; return its name.

        `documents` ({"spec": ..., "plan": ..., "hardware": ..., "summary": ...}) are written into the
        version as `<name>.json`; the run's `log.jsonl` is copied in when the staged folder has none.
        A staged folder with a truncated or non-finite safetensors file is refused (RunError) and left
        where it is; `adapter` keeps pointing at the previous version.
        """
        self._need_lock()
        if self.run(run_id)["status"] != "running":
            raise ValueError(f"run {run_id} has already ended")
        staged = Path(staged_dir)
        check_staged(staged)
        versions = self.root / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        # Never reuse a number, even of a version deleted by hand: the manifest may still name it.
        used = [p.name for p in self.versions()] + [r["version"] or "v0" for r in self.load_manifest()["runs"]]
        name = f"v{max(int(v[1:]) for v in ['v0', *used]) + 1:04d}"
        tmp = versions / f".{name}.tmp"
        moved = assemble_version(staged, versions, name, run_id, metrics, documents, self.run_dir(run_id) / "log.jsonl")
        try:
            verify(versions / name)
            self._point(name)
        except BaseException:
            # The pointer did not move: take the version back out, so no complete-looking version
            # that never became current is left behind (a full disk can fail the pointer's write).
            with contextlib.suppress(OSError, RunError):
                if self.current_version() != versions / name:  # a Ctrl-C just after the rename: keep it
                    os.replace(versions / name, tmp)
                    if moved:
                        os.replace(tmp, staged)  # give the caller its adapter back
                    shutil.rmtree(tmp, ignore_errors=True)
            raise

        def record(m: dict[str, Any]) -> None:
            run = _find_run(m, run_id)
            run["version"] = name
            run["metrics"].update(metrics)
            m["current"] = name

        self._update(record)
        return name

    def end_run(
        self, run_id: str, status: str, metrics: Mapping[str, Any] | None = None, message: str | None = None
    ) -> None:
        """Close a run: status ok | failed | interrupted, its end time, final metrics, a short message."""
        self._need_lock()
        if status not in ENDED:
            raise ValueError(f"a run ends {' | '.join(ENDED)}, not {status!r}")

        def close(m: dict[str, Any]) -> None:
            run = _find_run(m, run_id)
            run.update(status=status, ended=durable.now_iso(), message=message)
            run["metrics"].update(metrics or {})

        self._update(close)

    def switch(self, version: str) -> Path:
        """Point `adapter` at an existing version (a roll-back), after verifying it."""
        self._need_lock()
        folder = self.root / "versions" / version
        if not _VERSION.fullmatch(version) or not folder.is_dir():
            raise DlmError(f"there is no version {version}", f"versions: {[p.name for p in self.versions()]}")
        verify(folder)
        self._point(version)
        self._update(lambda m: m.__setitem__("current", version))
        return folder

    # -- helpers

    def _fresh(self) -> dict[str, Any]:
        return {
            "store_format": STORE_FORMAT,
            "dlm_id": self.dlm_id,
            "source": str(self.source) if self.source else None,
            "base": self.base,
            "created": durable.now_iso(),
            "current": None,
            "runs": [],
        }

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        manifest = self.load_manifest()
        before = json.dumps(manifest, sort_keys=True)
        result = change(manifest)
        if json.dumps(manifest, sort_keys=True) != before or not (self.root / MANIFEST).exists():
            durable.write_json(self.root / MANIFEST, manifest)
        return result

    def _point(self, name: str) -> None:
        """Rename a fresh symlink over `adapter`: readers see the old version or the new one."""
        link, tmp, target = self.root / POINTER, self.root / f"{POINTER}.tmp", f"versions/{name}"
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(target, tmp, target_is_directory=True)  # relative: the store can be moved
        except (OSError, NotImplementedError):
            # No symlinks here (Windows without developer mode, some shares): a one-line pointer file.
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(target + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, link)
        durable.fsync_dir(self.root)

    def _writable(self) -> None:
        if self.readonly:
            raise RuntimeError("this store was opened read-only (only rank 0 writes)")

    def _need_lock(self) -> None:
        self._writable()
        if not self._locked:
            raise RuntimeError("store mutations need `with store.lock():`")


def _find_run(manifest: dict[str, Any], run_id: str) -> dict[str, Any]:
    for run in manifest["runs"]:
        if run["run"] == run_id:
            return run
    raise ValueError(f"no run {run_id!r} in this store")
