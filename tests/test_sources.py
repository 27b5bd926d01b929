"""`training.sources`: folders of files as the document's prose; skipped files counted; the hash."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dlm.doc.schema import load_spec
from dlm.doc.sources import matches
from dlm.errors import DlmError
from dlm.plan.hardware import load_fixture
from dlm.plan.prepare import prepare
from tests.conftest import FIXTURES

ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"
HW = FIXTURES / "hardware" / "cpu.json"


def document(folder: Path, source: str, extra: str = "") -> Path:
    p = folder / "s.dlm"
    p.write_text(f"---\ndlm_id: {ID}\nbase_model: qwen2.5-0.5b\ntraining:\n{extra}  sources:\n{source}---\nIntro.\n")
    return p


def mixed_folder(root: Path, n: int = 196) -> None:
    (root / "docs" / "sub").mkdir(parents=True)
    for i in range(n):
        (root / "docs" / f"f{i:03}{['.md', '.py', '.txt'][i % 3]}").write_text(f"Content number {i}.\n" * 3)
    (root / "docs" / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (root / "docs" / "latin.txt").write_bytes("café über".encode("latin-1"))
    (root / "docs" / "sub" / "rows.jsonl").write_text('{"prompt": "q1", "completion": "a1"}\n{"text": "row prose"}\n')
    (root / "docs" / "sub" / "skipme.md").write_text("never read")


def test_two_hundred_mixed_files_plan_fast_and_say_what_was_skipped(tmp_path: Path) -> None:
    mixed_folder(tmp_path)
    doc = document(tmp_path, '    - path: docs\n      exclude: ["sub/skip*"]\n')
    assert len(list((tmp_path / "docs").rglob("*"))) >= 200
    t0 = time.monotonic()
    p = prepare(doc, load_fixture(HW))
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, elapsed
    found = {f.code: f for f in p.plan.findings}
    assert found["sources-read"].evidence["sources"]["docs"]["files"] == 197  # 196 + rows.jsonl
    assert found["sources-read"].evidence["sources"]["docs"]["tokens"] > 0
    assert {(s["why"], s["files"]) for s in found["sources-skipped"].evidence["skipped"]} == {
        ("binary", 1),
        ("not UTF-8", 1),
    }
    prose = [s for s in p.doc.sections if s.kind == "prose" and s.path.endswith((".md", ".py", ".txt"))]
    assert [s.text.split("\n")[0] for s in prose[:2]] == ["# docs/f000.md", "# docs/f001.py"]
    assert len(prose) == 196 and prose[-1].text.startswith("# docs/f195.md")  # sorted, each headed by its path
    assert not any("never read" in s.text for s in prose)
    rows = [s for s in p.doc.sections if s.path.endswith("rows.jsonl")]
    assert [s.kind for s in rows] == ["instruction", "prose"]


def test_no_sources_no_findings(tmp_path: Path) -> None:
    p = tmp_path / "plain.dlm"
    p.write_text(f"---\ndlm_id: {ID}\nbase_model: qwen2.5-0.5b\n---\nJust prose.\n")
    codes = [f.code for f in prepare(p, load_fixture(HW)).plan.findings]
    assert "sources-read" not in codes and "sources-skipped" not in codes


def test_editing_or_renaming_a_file_changes_the_hash(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("alpha")
    doc = document(tmp_path, "    - path: notes\n")
    first = load_spec(doc)[0].sha256
    assert load_spec(doc)[0].sha256 == first  # the near miss: nothing changed
    (tmp_path / "notes" / "a.md").write_text("alpha!")
    edited = load_spec(doc)[0].sha256
    (tmp_path / "notes" / "a.md").rename(tmp_path / "notes" / "b.md")
    renamed = load_spec(doc)[0].sha256
    assert len({first, edited, renamed}) == 3


def test_limits_and_globs(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    for name, size in [("a.md", 10), ("b.md", 500), ("c.txt", 10), ("d.md", 10), ("e.md", 10)]:
        (tmp_path / "n" / name).write_text("x" * size)
    doc = document(
        tmp_path,
        '    - path: n\n      include: "*.md"\n      exclude: [d.md]\n      max_files: 2\n      max_bytes_per_file: 100\n',
    )
    d, _ = load_spec(doc)
    (read,) = d.sources
    assert [Path(f).name for f in read.files] == ["a.md"]  # a, b (too large), then max_files cut e
    assert dict(read.skipped) == {"too large": 1, "past max_files": 1}


@pytest.mark.parametrize(
    ("rel", "pattern", "hit"),
    [("a.py", "**/*.py", True), ("x/y/a.py", "**/*.py", True), ("a.pyc", "**/*.py", False), ("x/a", "x/**", True)],
)
def test_glob_matching(rel: str, pattern: str, hit: bool) -> None:
    assert matches(rel, pattern) is hit


def test_a_source_outside_the_folder_needs_the_permissive_policy(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.md").write_text("outside text")
    (tmp_path / "doc").mkdir()
    doc = document(tmp_path / "doc", "    - path: ../outside\n")
    with pytest.raises(DlmError) as info:
        load_spec(doc)
    assert (info.value.line, "outside the document's folder" in info.value.message) == (6, True)
    assert "sources_policy: permissive" in (info.value.hint or "")
    allowed = document(tmp_path / "doc", "    - path: ../outside\n", extra="  sources_policy: permissive\n")
    d, spec = load_spec(allowed)
    assert spec.training.sources_policy == "permissive" and "outside text" in d.sections[-1].text


def test_a_missing_source_folder_and_a_bad_key_come_together(tmp_path: Path) -> None:
    doc = document(tmp_path, "    - path: nowhere\n      max_file: 3\n")
    with pytest.raises(DlmError) as info:
        load_spec(doc)
    errors = info.value.errors  # type: ignore[attr-defined]
    assert [(e.line, e.message.split(":")[0]) for e in errors] == [
        (6, "source folder not found"),
        (7, "unknown key 'max_file'"),
    ]
    assert "did you mean 'max_files'" in (errors[1].hint or "")


def test_editing_a_source_file_makes_the_store_stale(tmp_path: Path) -> None:
    from dlm.store.current import corpus_sha256, doc_sha256

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("alpha")
    doc = document(tmp_path, "    - path: notes\n")
    before = prepare(doc, load_fixture(HW))
    (tmp_path / "notes" / "a.md").write_text("alpha, edited")
    after = prepare(doc, load_fixture(HW))
    assert doc_sha256(before) != doc_sha256(after) and corpus_sha256(before) != corpus_sha256(after)
    plain = tmp_path / "plain.dlm"
    plain.write_text(f"---\ndlm_id: {ID}\nbase_model: qwen2.5-0.5b\n---\nJust prose.\n")
    import hashlib

    p = prepare(plain, load_fixture(HW))  # a document without files: the text's own hash, as before
    assert doc_sha256(p) == hashlib.sha256(p.doc.text.encode("utf-8")).hexdigest()


def test_a_link_leading_out_of_the_folder_is_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("outside")
    (tmp_path / "doc" / "notes").mkdir(parents=True)
    (tmp_path / "doc" / "notes" / "ok.md").write_text("inside")
    (tmp_path / "doc" / "notes" / "link.md").symlink_to(tmp_path / "secret.txt")
    d, _ = load_spec(document(tmp_path / "doc", "    - path: notes\n"))
    (read,) = d.sources
    assert [Path(f).name for f in read.files] == ["ok.md"]
    assert dict(read.skipped) == {"not a regular file inside the folder": 1}
    assert not any("outside" in s.text for s in d.sections)
