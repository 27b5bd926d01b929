"""The store: atomic manifest, versions, the adapter pointer, corruption checks, the lock, twin copies."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dlm.errors import DlmError, RunError
from dlm.store.integrity import check_safetensors, verify
from dlm.store.opening import open_store
from dlm.store.store import store_root

ID, OTHER_ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D", "01JC8Z3T6V7W8X9Y0Z1A2B3C4E"
VERSIONS = {"torch": "2.4", "transformers": "5.0", "peft": "0.17", "trl": "1.0", "dlm": "0.1.0"}
REPO = Path(__file__).resolve().parent.parent


def write_doc(path: Path, dlm_id: str = ID) -> Path:
    path.write_text(f"---\ndlm_id: {dlm_id}\nbase_model: smollm2-135m\n---\nSome prose.\n")
    return path


def staged(folder: Path, value: float = 1.0, **extra: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    tensors = {"base_model.q_proj.lora_A.weight": np.full((4, 8), value, np.float32), **extra}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    return folder


@pytest.fixture
def store(home: Path, tmp_path: Path):
    return open_store(home, ID, write_doc(tmp_path / "notes.dlm"), "smollm2-135m")


def train_once(store, tmp_path: Path, name: str, value: float = 1.0) -> str:
    with store.lock():
        run = store.begin_run("ab" * 32, 42, VERSIONS)
        version = store.commit_version(run, staged(tmp_path / name, value), {"eval_loss": 1.5})
        store.end_run(run, "ok", {"train_loss": 1.2})
    return version


def manifest(store) -> dict:
    return json.loads((store.root / "manifest.json").read_text())


# ---------------------------------------------------------------- layout, manifest, versions


def test_new_store_layout_and_manifest(store, home, tmp_path):
    assert store.root == store_root(home, ID) == home / "store" / ID
    m = manifest(store)
    assert m["dlm_id"] == ID and m["source"] == str((tmp_path / "notes.dlm").resolve())
    assert m["base"] == "smollm2-135m" and m["runs"] == [] and m["current"] is None
    assert (store.root / "versions").is_dir() and (store.root / "runs").is_dir()
    assert store.current_version() is None and store.versions() == []


def test_versions_and_runs_are_numbered_and_recorded(store, tmp_path):
    assert train_once(store, tmp_path, "a") == "v0001"
    assert train_once(store, tmp_path, "b") == "v0002"
    m = manifest(store)
    assert [r["run"] for r in m["runs"]] == ["r0001", "r0002"]
    run = m["runs"][1]
    assert run["version"] == "v0002" and run["status"] == "ok" and run["seed"] == 42
    assert run["metrics"] == {"eval_loss": 1.5, "train_loss": 1.2} and run["versions"] == VERSIONS
    assert run["started"].endswith("Z") and run["ended"].endswith("Z") and run["doc_sha256"] == "ab" * 32
    assert m["current"] == "v0002" and [p.name for p in store.versions()] == ["v0001", "v0002"]
    assert store.run_dir("r0002").is_dir()


def test_version_folder_holds_documents_log_and_checksums(store, tmp_path):
    with store.lock():
        run = store.begin_run("00" * 32, 7, VERSIONS)
        (store.run_dir(run) / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        docs = {"spec": {"lora_r": 4}, "plan": {"reason": "x"}, "hardware": {"device": "cpu"}}
        v = store.commit_version(run, staged(tmp_path / "s"), {"eval_loss": float("nan")}, documents=docs)
        store.end_run(run, "ok")
    folder = store.root / "versions" / v
    names = {
        "adapter_model.safetensors",
        "adapter_config.json",
        "spec.json",
        "plan.json",
        "hardware.json",
        "summary.json",
        "log.jsonl",
    }
    record = json.loads((folder / "files.json").read_text())
    assert set(record["files"]) == names and record["run"] == run
    assert json.loads((folder / "spec.json").read_text()) == {"lora_r": 4}
    assert (folder / "log.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    assert manifest(store)["runs"][0]["metrics"] == {"eval_loss": None}  # NaN is not JSON
    verify(folder)
    assert not (tmp_path / "s").exists()  # moved, not copied


def test_pointer_moves_only_after_a_commit(store, tmp_path):
    v1 = train_once(store, tmp_path, "a")
    link = store.root / "adapter"
    assert link.is_symlink() and os.readlink(link) == "versions/v0001"  # relative: the store can move
    assert store.current_version() == store.root / "versions" / v1
    with store.lock():
        run = store.begin_run("cd" * 32, 42, VERSIONS)
        assert store.current_version().name == "v0001"  # a running run changes nothing
        store.end_run(run, "interrupted")
    assert store.current_version().name == "v0001" and manifest(store)["current"] == "v0001"


def test_pointer_file_fallback_without_symlinks(store, tmp_path, monkeypatch):
    def no_symlinks(*args, **kwargs):
        raise OSError("symlinks are not supported here")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    train_once(store, tmp_path, "a")
    link = store.root / "adapter"
    assert link.is_file() and not link.is_symlink() and link.read_text() == "versions/v0001\n"
    assert store.current_version().name == "v0001"


def test_manifest_survives_a_crash_mid_write(store, tmp_path):
    train_once(store, tmp_path, "a")
    before = manifest(store)
    # A real crash: the process dies after the temp file is written and fsynced, before the rename.
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from dlm.store.opening import open_store
        s = open_store(Path({str(store.root.parent.parent)!r}), {ID!r}, Path({str(store.source)!r}), "b")
        with s.lock():
            os.replace = lambda *a: os._exit(9)
            s.begin_run("ef" * 32, 1, {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    leftovers = list(store.root.glob(".manifest.json.*.tmp"))
    assert leftovers and json.loads(leftovers[0].read_text())["runs"][-1]["run"] == "r0002"
    assert store.load_manifest() == before  # the old manifest, whole
    with store.lock():  # the next holder sweeps the half-done write away
        pass
    assert not list(store.root.glob(".manifest.json.*.tmp")) and manifest(store) == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-a-manifest"])
def test_damaged_manifest_is_a_clear_run_error(store, tmp_path, damage):
    train_once(store, tmp_path, "a")
    path = store.root / "manifest.json"
    text = path.read_text()
    path.write_text({"truncate": text[: len(text) // 2], "garbage": "\x00\x00", "not-a-manifest": "[1, 2]"}[damage])
    with pytest.raises(RunError) as err:
        store.load_manifest()
    assert err.value.exit_code == 1 and "manifest" in err.value.message
    assert "versions" in err.value.hint and "mv " in err.value.hint and err.value.path == str(path)
    with pytest.raises(RunError):
        open_store(store.root.parent.parent, ID, store.source, "b")


def test_missing_manifest_with_versions_is_an_error(store, tmp_path):
    train_once(store, tmp_path, "a")
    (store.root / "manifest.json").unlink()
    with pytest.raises(RunError, match="missing"):
        store.load_manifest()


# ---------------------------------------------------------------- refusing bad adapters


def refused(store, tmp_path: Path, folder: Path, match: str) -> None:
    with store.lock():
        run = store.begin_run("12" * 32, 42, VERSIONS)
        with pytest.raises(RunError, match=match):
            store.commit_version(run, folder, {})
        store.end_run(run, "failed")
    assert store.current_version().name == "v0001" and manifest(store)["current"] == "v0001"
    assert [p.name for p in store.versions()] == ["v0001"]
    assert not list((store.root / "versions").glob(".*")) and folder.is_dir()  # left for the caller


def test_truncated_safetensors_is_refused_and_pointer_stays(store, tmp_path):
    train_once(store, tmp_path, "a")
    bad = staged(tmp_path / "bad")
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    refused(store, tmp_path, bad, "promises")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor_is_refused(store, tmp_path, value):
    train_once(store, tmp_path, "a")
    bad = staged(tmp_path / "bad", 1.0, **{"lora_B.weight": np.array([[0.0, value]], np.float16)})
    refused(store, tmp_path, bad, "NaN or infinite")


def test_bf16_nan_is_found_without_numpy_support_for_bf16(tmp_path):
    def bf16_file(bits: list[int]) -> Path:
        data = struct.pack(f"<{len(bits)}H", *bits)
        header = json.dumps({"w": {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [0, len(data)]}}).encode()
        path = tmp_path / f"{bits[-1]}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return path

    check_safetensors(bf16_file([0x3F80, 0xBF80]))  # 1.0, -1.0
    with pytest.raises(RunError, match="NaN"):
        check_safetensors(bf16_file([0x3F80, 0x7FC0]))  # NaN
    with pytest.raises(RunError, match="NaN or infinite"):
        check_safetensors(bf16_file([0xFF80]))  # -inf


def test_malformed_headers_are_refused(tmp_path):
    def file(header: bytes, data: bytes = b"") -> Path:
        path = tmp_path / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + data)
        return path

    with pytest.raises(RunError, match="header is cut off"):
        check_safetensors(_short(tmp_path))  # the header claims 4096 bytes, the file has 2
    with pytest.raises(RunError, match="not valid JSON"):
        check_safetensors(file(b"{nope"))
    with pytest.raises(RunError, match="does not match"):
        check_safetensors(
            file(json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"\0" * 8)
        )
    with pytest.raises(RunError, match="promises"):
        check_safetensors(
            file(json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), b"\0" * 12)
        )  # trailing bytes are as suspect as missing ones


def _short(tmp_path: Path) -> Path:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 4096) + b"{}")
    return path


def test_folder_without_safetensors_or_with_pickles_is_refused(store, tmp_path):
    train_once(store, tmp_path, "a")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(store, tmp_path, empty, "no .safetensors")
    pickled = staged(tmp_path / "pickled")
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    refused(store, tmp_path, pickled, "pickled")


# ---------------------------------------------------------------- verify


def test_verify_finds_an_edited_byte_a_missing_file_and_a_missing_record(store, tmp_path):
    folder = store.root / "versions" / train_once(store, tmp_path, "a")
    verify(folder)
    tensor = folder / "adapter_model.safetensors"
    data = bytearray(tensor.read_bytes())
    data[-1] ^= 0x01  # same size, one bit flipped
    tensor.write_bytes(bytes(data))
    with pytest.raises(RunError, match=r"adapter_model.safetensors was modified") as err:
        verify(folder)
    assert "v0001" in err.value.message and "dlm train" in err.value.hint
    (folder / "adapter_config.json").unlink()
    with pytest.raises(RunError, match="adapter_config.json is missing"):
        verify(folder)
    (folder / "files.json").write_text('{"files": ')
    with pytest.raises(RunError, match="not valid"):
        verify(folder)
    (folder / "files.json").unlink()
    with pytest.raises(RunError, match="files.json, its checksum record, is missing"):
        verify(folder)


def test_switch_rolls_back_to_a_verified_version(store, tmp_path):
    train_once(store, tmp_path, "a")
    train_once(store, tmp_path, "b", value=2.0)
    with store.lock():
        store.switch("v0001")
    assert store.current_version().name == "v0001" and manifest(store)["current"] == "v0001"
    (store.root / "versions" / "v0002" / "summary.json").write_text("{}")
    with store.lock(), pytest.raises(RunError, match="damaged"):
        store.switch("v0002")
    assert store.current_version().name == "v0001"


# ---------------------------------------------------------------- runs, resume, reconcile


def test_mutations_need_the_lock_and_a_writable_store(store, home, tmp_path):
    with pytest.raises(RuntimeError, match="lock"):
        store.begin_run("00", 1, {})
    reader = open_store(home, ID, tmp_path / "notes.dlm", None, readonly=True)
    with pytest.raises(RuntimeError, match="read-only"):
        with reader.lock():
            pass
    with pytest.raises(ValueError):
        with store.lock():
            store.end_run(store.begin_run("00", 1, {}), "running")


def test_stale_running_run_is_marked_interrupted_and_resumable(store, home, tmp_path):
    train_once(store, tmp_path, "a")
    dead = open_store(home, ID, store.source, "smollm2-135m")  # a process that will die mid-run
    with dead.lock():
        run = dead.begin_run("34" * 32, 42, VERSIONS)
    checkpoints = store.run_dir(run) / "checkpoints"
    for n, state in ((10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, None), (40, '{"global_st')):
        (checkpoints / f"checkpoint-{n}").mkdir(parents=True)  # 30: a save cut short; 40: killed mid-write
        if state is not None:
            (checkpoints / f"checkpoint-{n}" / "trainer_state.json").write_text(state)
    assert manifest(store)["runs"][-1]["status"] == "running"  # its process died without a word
    with store.lock():
        assert store.run(run)["status"] == "interrupted"
        assert store.latest_checkpoint() == checkpoints / "checkpoint-20"
        later = store.begin_run("34" * 32, 42, VERSIONS)  # a resume that failed before saving anything
        store.end_run(later, "failed", message="out of memory")
        assert store.latest_checkpoint() == checkpoints / "checkpoint-20"
    train_once(store, tmp_path, "b")  # a finished run supersedes older checkpoints
    assert store.latest_checkpoint() is None


def test_own_run_survives_releasing_and_retaking_the_lock(store, tmp_path):
    with store.lock():
        run = store.begin_run("56" * 32, 42, VERSIONS)
    with store.lock():  # the same process comes back to commit: its run is not stale
        assert store.run(run)["status"] == "running"
        store.commit_version(run, staged(tmp_path / "a"), {})
        store.end_run(run, "ok")
    assert store.run(run)["version"] == "v0001"


def test_a_deleted_version_number_is_never_reused(store, tmp_path):
    import shutil

    train_once(store, tmp_path, "a")
    train_once(store, tmp_path, "b")
    (store.root / "adapter").unlink()
    shutil.rmtree(store.root / "versions" / "v0002")
    assert train_once(store, tmp_path, "c") == "v0003"


def test_dangling_pointer_is_a_clear_error_and_the_next_train_repairs_it(store, tmp_path):
    train_once(store, tmp_path, "a")
    (store.root / "adapter").unlink()
    (store.root / "adapter").symlink_to("versions/v0009")
    with pytest.raises(RunError, match="not a version"):
        store.current_version()
    assert train_once(store, tmp_path, "b") == "v0002" and store.current_version().name == "v0002"


def test_lost_manifest_update_after_commit_is_recovered(store, tmp_path):
    train_once(store, tmp_path, "a")
    m = manifest(store)
    m["runs"][0]["version"], m["current"] = None, None
    (store.root / "manifest.json").write_text(json.dumps(m))
    with store.lock():
        pass
    assert manifest(store)["runs"][0]["version"] == "v0001" and manifest(store)["current"] == "v0001"


def test_death_between_version_and_pointer_finishes_the_commit(store, tmp_path):
    """The disk as a SIGKILL leaves it after `versions/v0002` appeared but before `adapter` moved:
    the next lock verifies v0002, points at it and records it; the run counts as finished."""
    train_once(store, tmp_path, "a")
    before = (store.root / "manifest.json").read_bytes()
    with store.lock():
        run = store.begin_run("cd" * 32, 42, VERSIONS)
        running = (store.root / "manifest.json").read_bytes()
        store.commit_version(run, staged(tmp_path / "b", 2.0), {"eval_loss": 1.0})
    (store.root / "manifest.json").write_bytes(running)  # the manifest never heard of v0002
    (store.root / "adapter").unlink()
    (store.root / "adapter").symlink_to("versions/v0001")  # nor did the pointer
    assert before != running and store.current_version().name == "v0001"
    with store.lock():
        pass
    m = manifest(store)
    assert store.current_version().name == "v0002" and m["current"] == "v0002"
    assert m["runs"][-1]["version"] == "v0002" and m["runs"][-1]["status"] == "ok"
    assert store.latest_checkpoint() is None  # a finished run: nothing to resume


def test_damaged_lost_version_is_not_made_current(store, tmp_path):
    train_once(store, tmp_path, "a")
    with store.lock():
        run = store.begin_run("cd" * 32, 42, VERSIONS)
        running = (store.root / "manifest.json").read_bytes()
        store.commit_version(run, staged(tmp_path / "b", 2.0), {"eval_loss": 1.0})
    (store.root / "manifest.json").write_bytes(running)
    (store.root / "adapter").unlink()
    (store.root / "adapter").symlink_to("versions/v0001")
    weights = store.root / "versions" / "v0002" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with store.lock():
        pass
    assert store.current_version().name == "v0001" and manifest(store)["current"] == "v0001"


def test_failed_pointer_write_leaves_no_version_behind(store, tmp_path, monkeypatch):
    """ENOSPC while the pointer is replaced: the commit raises, the new version is taken back out,
    the adapter goes back to its staging folder, and the current version is untouched."""
    import errno

    from dlm.store import store as store_module

    train_once(store, tmp_path, "a")

    def full(self, name):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.Store, "_point", full)
    folder = staged(tmp_path / "b", 2.0)
    with store.lock():
        run = store.begin_run("cd" * 32, 42, VERSIONS)
        with pytest.raises(OSError, match="No space"):
            store.commit_version(run, folder, {"eval_loss": 1.0})
        store.end_run(run, "failed", message="disk full")
    monkeypatch.undo()
    assert [v.name for v in store.versions()] == ["v0001"] and store.current_version().name == "v0001"
    assert not list((store.root / "versions").glob(".*.tmp"))
    assert (folder / "adapter_model.safetensors").is_file()
    verify(store.current_version())
    with store.lock():
        pass
    assert manifest(store)["current"] == "v0001" and manifest(store)["runs"][-1]["status"] == "failed"


# ---------------------------------------------------------------- the lock


HOLDER = """
import sys
from pathlib import Path
from dlm.store.opening import open_store
s = open_store(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), "b")
with s.lock():
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_lock_held_by_another_process_is_refused_with_its_pid(store, home, tmp_path):
    other = open_store(home, OTHER_ID, write_doc(tmp_path / "other.dlm", OTHER_ID), "b")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(home), ID, str(store.source)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError) as err:
            with store.lock():
                pass
        assert err.value.exit_code == 1
        assert err.value.message == f"another dlm train is running on this document (pid {holder.pid})"
        assert f"kill -INT {holder.pid}" in err.value.hint
        with other.lock():  # another document locks independently
            assert (other.root / ".lock.pid").read_text().strip() == str(os.getpid())
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    with store.lock():  # released with the process
        assert (store.root / ".lock.pid").read_text().strip() == str(os.getpid())
    assert not (store.root / ".lock.pid").exists()


def test_lock_is_not_reentrant_within_a_process(store):
    with store.lock(), pytest.raises(RunError, match=f"pid {os.getpid()}"):
        with store.lock():
            pass


# ---------------------------------------------------------------- twin copies and moved files


def test_two_documents_with_one_id_clash(store, home, tmp_path):
    copy = write_doc(tmp_path / "copy.dlm")
    for readonly in (False, True):
        with pytest.raises(DlmError) as err:
            open_store(home, ID, copy, "smollm2-135m", readonly=readonly)
        assert type(err.value) is DlmError and err.value.exit_code == 2
        assert err.value.message == f"another document, {store.source}, already uses dlm_id {ID}"
        assert "dlm twin" in err.value.hint and str(copy) in err.value.hint
    assert manifest(store)["source"] == str(store.source)  # nothing adopted


def test_moved_document_is_adopted(store, home, tmp_path):
    train_once(store, tmp_path, "a")
    moved = tmp_path / "moved.dlm"
    store.source.rename(moved)
    again = open_store(home, ID, moved, "smollm2-135m")
    assert manifest(again)["source"] == str(moved.resolve())
    assert again.current_version().name == "v0001"  # its adapters come along


def test_original_with_a_new_id_no_longer_claims_the_store(store, home, tmp_path):
    write_doc(store.source, OTHER_ID)  # the user re-identified the original by hand
    copy = write_doc(tmp_path / "copy.dlm")
    open_store(home, ID, copy, "smollm2-135m")
    assert manifest(store)["source"] == str(copy.resolve())


def test_same_file_through_another_path_is_not_a_twin(store, home, tmp_path):
    alias = tmp_path / "alias.dlm"
    alias.symlink_to(store.source)
    assert open_store(home, ID, alias, "smollm2-135m").root == store.root


def test_unsafe_ids_never_name_a_folder(home):
    for bad in ("../../etc", "a/b", ""):
        with pytest.raises(DlmError):
            store_root(home, bad)
