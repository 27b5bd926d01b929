"""Hostile and broken input through the real CLI: every case exits 2 with one located message and a
hint, prints no traceback, and writes nothing (no DLM_HOME content, no new file next to the input).

tests/malformed/ holds one small file per grammar or schema mistake; this file covers what does not
fit there: input built at test time (alias bombs of several shapes, files over the size limit,
binary and wrongly encoded files, 1000-level nesting, symlinks, FIFOs, over-long names), malformed
`.jsonl` rows beyond the ones in tests/malformed/, and option errors of `doctor`, `twin` and `init`.
docs/reliability.md lists every case with what dlm does.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"
FRONT = f"---\ndlm_id: {ID}\ndlm_version: 1\nbase_model: smollm2-135m\n"  # 4 lines, still open
LOCATED = re.compile(r"^(?P<path>.+?):(?P<line>\d+):(?P<col>\d+): \S")


def dlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dlm", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def tree(folder: Path) -> set[str]:
    """Every path under `folder`, except the test's own DLM_HOME (checked on its own: it stays empty)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.relative_to(folder).parts[0] != "dlm-home"}


def refused(
    proc: subprocess.CompletedProcess,
    home: Path,
    *,
    where: str | None = None,
    message: str | None = None,
    located: bool = True,
) -> re.Match | None:
    """Exit 2, no traceback, a `hint:` line, nothing in DLM_HOME; with `located`, `path:line:col: ...` first."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 2, output
    lines = proc.stderr.splitlines()
    assert lines, output
    assert any(line.startswith("hint: ") and line[6:].strip() for line in lines), output
    assert not any(home.iterdir()), "a refused input must not write anything"
    if message is not None:
        assert message in lines[0], lines[0]
    m = LOCATED.match(lines[0])
    if located:
        assert m, f"{lines[0]!r} is not path:line:col: message"
        assert int(m["line"]) >= 1 and int(m["col"]) >= 1
    if where is not None:
        assert lines[0].startswith(where + ":"), f"{lines[0]!r} does not start with {where!r}:"
    return m


def doctor_refuses(folder: Path, name: str, home: Path, **expect) -> re.Match | None:
    before = tree(folder)
    t0 = time.monotonic()
    proc = dlm("doctor", name, cwd=folder)
    elapsed = time.monotonic() - t0
    m = refused(proc, home, **expect)
    assert tree(folder) == before, "nothing may be written next to the input"
    assert elapsed < 60, f"refusing took {elapsed:.0f} s"
    return m


def write(folder: Path, name: str, content: str | bytes) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return p


def line_of(path: Path, prefix: str) -> int:
    """1-based number of the first line of `path` that starts with `prefix`."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return next(i for i, line in enumerate(lines, 1) if line.startswith(prefix))


# ---------------------------------------------------------------- YAML alias bombs


def laughs(fan: int, levels: int, indent: str = "", key: str = "k") -> list[str]:
    """Billion laughs: level 0 is `fan` strings, each next level `fan` aliases of the one before."""
    out = [f"{indent}{key}0: &{key}0 [" + ", ".join(["lol"] * fan) + "]"]
    for i in range(1, levels):
        out.append(f"{indent}{key}{i}: &{key}{i} [" + ", ".join([f"*{key}{i - 1}"] * fan) + "]")
    return out


@pytest.mark.parametrize("fan, levels", [(2, 16), (4, 8), (10, 5), (100, 3), (3000, 2)])
def test_alias_bombs_of_several_depths_stop_at_the_node_bound(
    tmp_path: Path, home: Path, fan: int, levels: int
) -> None:
    p = write(tmp_path, "bomb.dlm", FRONT + "\n".join(laughs(fan, levels)) + "\n---\nProse.\n")
    m = doctor_refuses(tmp_path, "bomb.dlm", home, message="expands to more than 10,000")
    key = re.search(r"'(k\d+)' expands", m.string)[1]  # the first key whose value crosses the bound
    assert int(m["line"]) == line_of(p, f"{key}:") and int(m["col"]) == 1


def test_alias_bomb_in_mappings_and_merge_keys(tmp_path: Path, home: Path) -> None:
    lines = ["m0: &m0 {" + ", ".join(f"x{i}: lol" for i in range(10)) + "}"]
    for lvl in range(1, 6):
        lines.append(f"m{lvl}: &m{lvl} {{" + ", ".join(f"x{i}: *m{lvl - 1}" for i in range(10)) + "}")
    lines.append("merged: {<<: [" + ", ".join(["*m5"] * 10) + "]}")
    write(tmp_path, "map-bomb.dlm", FRONT + "\n".join(lines) + "\n---\nProse.\n")
    doctor_refuses(tmp_path, "map-bomb.dlm", home, where="map-bomb.dlm:8:1", message="'m3' expands to more than 10,000")


def test_alias_bomb_hidden_under_a_real_key(tmp_path: Path, home: Path) -> None:
    """The bound counts nodes, not keys: a bomb inside training.target_modules is stopped too."""
    nested = ", ".join(f"&t{i} [" + ", ".join([f"*t{i - 1}" if i else "q_proj"] * 10) + "]" for i in range(6))
    write(tmp_path, "hidden.dlm", FRONT + f"training:\n  target_modules: [{nested}]\n---\nProse.\n")
    doctor_refuses(
        tmp_path, "hidden.dlm", home, where="hidden.dlm:5:1", message="'training' expands to more than 10,000"
    )


def test_alias_bomb_in_a_standalone_spec(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "bomb.yaml", f"dlm_id: {ID}\n" + "\n".join(laughs(9, 9)) + "\n")
    doctor_refuses(tmp_path, "bomb.yaml", home, where="bomb.yaml:6:1", message="'k4' expands to more than 10,000")


@pytest.mark.parametrize("value", ["&x [*x]", "&x {k: *x}", "&x [a, [b, *x]]"])
def test_self_referencing_alias_hits_the_depth_limit(tmp_path: Path, home: Path, value: str) -> None:
    write(tmp_path, "loop.dlm", FRONT + f"extra: {value}\n---\nProse.\n")
    doctor_refuses(tmp_path, "loop.dlm", home, message="nested deeper than 20")


# ---------------------------------------------------------------- deep nesting


@pytest.mark.parametrize(
    "name, yaml_text, line",
    [
        ("flow-lists", "extra: " + "[" * 1000 + "]" * 1000, 5),
        ("flow-lists-unclosed", "extra: " + "[" * 1000, 5),
        ("flow-maps", "extra: " + "{a: " * 1000 + "1" + "}" * 1000, 5),
        ("block-maps", "\n".join(" " * i + f"k{i}:" for i in range(1000)) + " 1", 25),
        ("block-lists", "extra:\n" + "- " * 1000 + "x", 6),
    ],
)
def test_thousand_level_nesting_is_refused_at_level_21(
    tmp_path: Path, home: Path, name: str, yaml_text: str, line: int
) -> None:
    write(tmp_path, f"{name}.dlm", FRONT + yaml_text + "\n---\nProse.\n")
    m = doctor_refuses(tmp_path, f"{name}.dlm", home, message="nested deeper than 20")
    assert int(m["line"]) == line


def test_thousand_level_nesting_in_a_standalone_spec(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "deep.yaml", f"dlm_id: {ID}\ntraining: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n")
    doctor_refuses(tmp_path, "deep.yaml", home, where="deep.yaml:2:87", message="nested deeper than 20")


# ---------------------------------------------------------------- size limits


def test_document_over_the_size_limit(tmp_path: Path, home: Path) -> None:
    head = (FRONT + "---\n").encode()
    write(tmp_path, "big.dlm", head + b"x" * (8 * 2**20 - len(head) + 1))
    doctor_refuses(tmp_path, "big.dlm", home, where="big.dlm:1:1", message="larger than 8 MiB")


def test_spec_over_the_size_limit(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "big.yaml", f"dlm_id: {ID}\n# ".encode() + b"x" * (8 * 2**20))
    doctor_refuses(tmp_path, "big.yaml", home, where="big.yaml:1:1", message="larger than 8 MiB")


def test_data_file_over_the_size_limit(tmp_path: Path, home: Path) -> None:
    with open(tmp_path / "huge.txt", "wb") as f:  # sparse: costs no disk
        f.truncate(256 * 2**20 + 1)
    write(tmp_path, "d.dlm", FRONT + "data: [huge.txt]\n---\nProse.\n")
    doctor_refuses(tmp_path, "d.dlm", home, where="huge.txt:1:1", message="larger than 256 MiB")


# ---------------------------------------------------------------- binary files and encodings

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


@pytest.mark.parametrize(
    "name, content, where, message",
    [
        ("png.dlm", PNG, "png.dlm:1:1", "not valid UTF-8 (byte 0x89)"),
        ("elf.dlm", b"\x7fELF\x02\x01\x01\x00" + bytes(56), "elf.dlm:1:8", "binary file"),
        ("zeros.dlm", bytes(4096), "zeros.dlm:1:1", "binary file"),
        (
            "utf16le.dlm",
            "\ufeff---\ndlm_id: x\n---\n".encode("utf-16-le"),
            "utf16le.dlm:1:1",
            "not valid UTF-8 (byte 0xff)",
        ),
        (
            "utf16be.dlm",
            "\ufeff---\ndlm_id: x\n---\n".encode("utf-16-be"),
            "utf16be.dlm:1:1",
            "not valid UTF-8 (byte 0xfe)",
        ),
        ("utf16.yaml", f"dlm_id: {ID}\n".encode("utf-16"), "utf16.yaml:1:1", "not valid UTF-8"),
        (
            "cp1252.dlm",
            (FRONT + "system_prompt: Be \u201cbrief\u201d.\n---\nx\n").encode("cp1252"),
            "cp1252.dlm:5:19",
            "byte 0x93",
        ),
        ("overlong.dlm", (FRONT + "---\n").encode() + b"a \xc0\xaf b\n", "overlong.dlm:6:3", "byte 0xc0"),
        ("cesu.dlm", (FRONT + "---\n").encode() + b"\xed\xa0\x80\n", "cesu.dlm:6:1", "byte 0xed"),
        ("latin1.yaml", f"dlm_id: {ID}\nsystem_prompt: café\n".encode("latin-1"), "latin1.yaml:2:19", "byte 0xe9"),
    ],
)
def test_binary_and_non_utf8_files(
    tmp_path: Path, home: Path, name: str, content: bytes, where: str, message: str
) -> None:
    write(tmp_path, name, content)
    doctor_refuses(tmp_path, name, home, where=where, message=message)


def test_random_bytes(tmp_path: Path, home: Path) -> None:
    rng = random.Random(20240601)
    for i in range(5):
        write(tmp_path, f"noise{i}.dlm", rng.randbytes(rng.choice([1, 100, 65536])))
        doctor_refuses(tmp_path, f"noise{i}.dlm", home)


def test_a_lone_surrogate_escape_in_yaml(tmp_path: Path, home: Path) -> None:
    """`"\\ud800"` is valid YAML and valid UTF-8 on disk, but not text (it used to crash later)."""
    write(tmp_path, "sur.dlm", FRONT + 'system_prompt: "hi \\ud800"\n---\nx\n')
    doctor_refuses(tmp_path, "sur.dlm", home, where="sur.dlm:5:16", message="surrogate")


def test_binary_data_file(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "data/picture.md", PNG)
    write(tmp_path, "d.dlm", FRONT + "data: [data/picture.md]\n---\nProse.\n")
    doctor_refuses(tmp_path, "d.dlm", home, where="data/picture.md:1:1", message="not valid UTF-8")


# ---------------------------------------------------------------- malformed .jsonl rows (beyond tests/malformed/)

GOOD = '{"prompt": "q", "completion": "a"}'


@pytest.mark.parametrize(
    "name, rows, where, message",
    [
        ("duplicate-key", [GOOD, '{"text": "a", "text": "b"}'], "2:15", "duplicate key 'text'"),
        ("surrogate", [GOOD, GOOD, '{"text": "x \\udc00 y"}'], "3:2", "surrogate"),
        ("huge-integer", ['{"text": ' + "9" * 5000 + "}"], "1:1", "too many digits"),
        ("deep-array", [GOOD, "[" * 100_000 + "]" * 100_000], "2:1", "nested too deeply"),
        ("nan", ['{"prompt": NaN, "completion": "a"}'], "1:2", "'prompt' must be a string (got number)"),
        ("trailing-garbage", [GOOD, GOOD, GOOD, '{"text": "a"} {"text": "b"}'], "4:15", "Extra data"),
        ("heldout-not-bool", [GOOD, '{"text": "a", "heldout": "yes"}'], "2:15", "'heldout' must be true or false"),
        (
            "bad-role",
            ['{"messages": [{"role": "User", "content": "q"}, {"role": "assistant", "content": "a"}]}'],
            "1:2",
            "unknown role 'User'",
        ),
        (
            "late-system",
            ['{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]}'],
            "1:2",
            "is a system message where an assistant message belongs",
        ),
        ("empty-messages", ['{"messages": []}'], "1:2", "non-empty list"),
        ("array-row", [GOOD, '["prompt", "completion"]'], "2:1", "the row is a JSON array, not an object"),
    ],
)
def test_malformed_jsonl_rows_name_the_file_and_row(
    tmp_path: Path, home: Path, name: str, rows: list[str], where: str, message: str
) -> None:
    write(tmp_path, f"data/{name}.jsonl", "\n".join(rows) + "\n")
    write(tmp_path, "spec.yaml", f"dlm_id: {ID}\ndata:\n  - data/{name}.jsonl\n")
    doctor_refuses(tmp_path, "spec.yaml", home, where=f"data/{name}.jsonl:{where}", message=message)


def test_jsonl_row_numbers_survive_crlf_blank_lines_and_a_bom(tmp_path: Path, home: Path) -> None:
    rows = ["\ufeff" + GOOD, "", "   ", GOOD, '{"text": 5}']
    write(tmp_path, "data/crlf.jsonl", "\r\n".join(rows) + "\r\n")
    write(tmp_path, "d.dlm", FRONT + "data: [data/crlf.jsonl]\n---\nProse.\n")
    doctor_refuses(tmp_path, "d.dlm", home, where="data/crlf.jsonl:5:2", message="'text' must be a string (got number)")


def test_invalid_utf8_inside_a_jsonl_row(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "data/bytes.jsonl", (GOOD + "\n" + GOOD + "\n").encode() + b'{"text": "caf\xe9"}\n')
    write(tmp_path, "d.dlm", FRONT + "data: [data/bytes.jsonl]\n---\nProse.\n")
    doctor_refuses(tmp_path, "d.dlm", home, where="data/bytes.jsonl:3:14", message="not valid UTF-8 (byte 0xe9)")


# ---------------------------------------------------------------- the data path policy


def data_doc(folder: Path, item: str, name: str = "d.dlm") -> str:
    write(folder, name, FRONT + f"data:\n  - {item}\n---\nProse.\n")
    return name


@pytest.mark.parametrize(
    "item, message",
    [
        ("nope/missing.jsonl", "data file not found"),
        ("~/notes.jsonl", "absolute data path"),
        ("data/../../outside.jsonl", "leads outside the document's folder"),
        ("./data/./../../../../../../../../etc/hosts.txt", "leads outside the document's folder"),
        ('"a\\0b.jsonl"', "not a usable data path"),
        ('"   "', "not a usable data path"),
        ("x" * 300 + ".jsonl", "cannot use data path"),
        ("data/notes.JSON", "unsupported data file type"),
    ],
)
def test_data_paths_refused_at_their_list_item(tmp_path: Path, home: Path, item: str, message: str) -> None:
    (tmp_path / "data").mkdir()
    doctor_refuses(tmp_path, data_doc(tmp_path, item), home, where="d.dlm:6:5", message=message)


def test_missing_data_file_in_a_spec(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "spec.yaml", f"dlm_id: {ID}\ndata: [a.jsonl, b.jsonl]\n")
    write(tmp_path, "a.jsonl", GOOD + "\n")
    doctor_refuses(tmp_path, "spec.yaml", home, where="spec.yaml:2:17", message="data file not found: b.jsonl")


def test_data_path_from_a_subfolder_document_cannot_climb_out(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "shared.jsonl", GOOD + "\n")
    (tmp_path / "docs").mkdir()
    data_doc(tmp_path / "docs", "../shared.jsonl")
    doctor_refuses(tmp_path, "docs/d.dlm", home, where="docs/d.dlm:6:5", message="leads outside")


def test_symlink_to_a_file_outside_is_refused(tmp_path: Path, home: Path) -> None:
    outside = write(tmp_path, "outside/secret.jsonl", GOOD + "\n")
    (tmp_path / "doc").mkdir()
    (tmp_path / "doc" / "link.jsonl").symlink_to(outside)
    data_doc(tmp_path / "doc", "link.jsonl")
    doctor_refuses(tmp_path / "doc", "d.dlm", home, where="d.dlm:6:5", message="leads outside the document's folder")


def test_symlinked_folder_outside_is_refused(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "outside/rows.jsonl", GOOD + "\n")
    (tmp_path / "doc").mkdir()
    (tmp_path / "doc" / "data").symlink_to(tmp_path / "outside", target_is_directory=True)
    data_doc(tmp_path / "doc", "data/rows.jsonl")
    doctor_refuses(tmp_path / "doc", "d.dlm", home, where="d.dlm:6:5", message="leads outside the document's folder")


def test_symlink_loop(tmp_path: Path, home: Path) -> None:
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    doctor_refuses(tmp_path, data_doc(tmp_path, "loop.jsonl"), home, where="d.dlm:6:5")


def test_data_path_that_is_a_folder_or_a_fifo(tmp_path: Path, home: Path) -> None:
    (tmp_path / "folder.jsonl").mkdir()
    doctor_refuses(tmp_path, data_doc(tmp_path, "folder.jsonl"), home, where="d.dlm:6:5", message="is not a file")
    os.mkfifo(tmp_path / "pipe.jsonl")  # reading it would block forever
    doctor_refuses(
        tmp_path, data_doc(tmp_path, "pipe.jsonl", "p.dlm"), home, where="p.dlm:6:5", message="is not a file"
    )


def test_symlink_inside_the_folder_is_allowed(tmp_path: Path, home: Path) -> None:
    """The policy is about where a path leads, not about links: a link that stays inside is fine."""
    write(tmp_path, "real/rows.jsonl", GOOD + "\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "real" / "rows.jsonl")
    proc = dlm("doctor", data_doc(tmp_path, "link.jsonl"), cwd=tmp_path)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------- option errors


@pytest.fixture
def doc(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        "notes.dlm",
        FRONT + "training:\n  lora_r: 8\n---\nSome prose.\n\n::instruction::\n### Q\nq?\n### A\na.\n",
    )


def test_doctor_hardware_file_missing(tmp_path: Path, home: Path, doc: Path) -> None:
    before = tree(tmp_path)
    refused(
        dlm("doctor", "--hardware", "missing.json", doc.name, cwd=tmp_path),
        home,
        where="missing.json",
        message="cannot read hardware file",
        located=False,
    )
    assert tree(tmp_path) == before


@pytest.mark.parametrize("content", ["not json", "[1]", "{}", "null", '{"device": "cpu", "bogus": 1}', ""])
def test_doctor_hardware_file_malformed(tmp_path: Path, home: Path, doc: Path, content: str) -> None:
    write(tmp_path, "hw.json", content)
    refused(
        dlm("doctor", "--hardware", "hw.json", doc.name, cwd=tmp_path),
        home,
        where="hw.json",
        message="cannot read hardware file",
        located=False,
    )


def test_doctor_hardware_file_with_wrong_value_types(tmp_path: Path, home: Path, doc: Path) -> None:
    write(tmp_path, "hw.json", json.dumps({"device": "cpu", "name": "x", "memory_bytes": "lots", "cores": 2}))
    proc = dlm("doctor", "--hardware", "hw.json", doc.name, cwd=tmp_path)
    refused(proc, home, where="hw.json", message="memory_bytes has the wrong type", located=False)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["nonsense"], "is not KEY=VALUE"),
        (["=dora"], "is not KEY=VALUE"),
        (["training.lora_r=-1"], "'lora_r'"),
        (["training.lora_rank=4"], "unknown key 'lora_rank'"),
        (["training.adapter=dora", "training.lora_dropout=2"], "'lora_dropout'"),
        (["dlm_id=01JC8Z3T6V7W8X9Y0Z1A2B3C4E"], "--set dlm_id is not allowed"),
        (["training=5"], "replaces only values written on one line"),
        (["a.b.c=1"], "nesting that deep"),
        (['system_prompt="\\ud800"'], "surrogate"),
    ],
)
def test_twin_refuses_bad_overrides_and_writes_nothing(
    tmp_path: Path, home: Path, doc: Path, sets: list[str], message: str
) -> None:
    before, text = tree(tmp_path), doc.read_text()
    args = [a for s in sets for a in ("--set", s)]
    refused(dlm("twin", doc.name, *args, cwd=tmp_path), home, message=message, located=False)
    assert tree(tmp_path) == before and doc.read_text() == text


def test_twin_of_a_broken_or_missing_document(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "broken.dlm", FRONT + "training:\n  lora_rank: 8\n---\nx\n")
    refused(
        dlm("twin", "broken.dlm", "--set", "training.adapter=dora", cwd=tmp_path),
        home,
        where="broken.dlm:6:3",
        message="unknown key 'lora_rank'",
    )
    refused(
        dlm("twin", "nope.dlm", "--set", "training.adapter=dora", cwd=tmp_path),
        home,
        where="nope.dlm",
        message="no such file",
        located=False,
    )
    assert tree(tmp_path) == {"broken.dlm"}


def test_twin_output_into_a_missing_folder(tmp_path: Path, home: Path, doc: Path) -> None:
    refused(
        dlm("twin", doc.name, "--set", "training.adapter=dora", "-o", "nowhere/t.dlm", cwd=tmp_path),
        home,
        message="does not exist",
        located=False,
    )
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("value", ["org/name", "x" * 300])
def test_twin_value_that_cannot_be_a_file_name(tmp_path: Path, home: Path, doc: Path, value: str) -> None:
    """The default output name is NAME-VALUE.dlm; a value with '/' or 300 characters cannot be one."""
    key = "base_model" if "/" in value else "system_prompt"
    before = tree(tmp_path)
    proc = dlm("twin", doc.name, "--set", f"{key}={value}", cwd=tmp_path)
    refused(proc, home, message="cannot be part of a file name", located=False)
    assert "-o" in proc.stderr and tree(tmp_path) == before


def test_init_refusals_write_nothing(tmp_path: Path, home: Path, doc: Path) -> None:
    text = doc.read_text()
    refused(dlm("init", "missing/new.dlm", cwd=tmp_path), home, message="does not exist", located=False)
    assert not (tmp_path / "missing").exists()
    refused(dlm("init", doc.name, cwd=tmp_path), home, message="already exists", located=False)
    assert doc.read_text() == text
    refused(dlm("init", "new.dlm", "--adapter", "DoRA", cwd=tmp_path), home, message="--adapter", located=False)
    assert tree(tmp_path) == {doc.name}


def test_base_model_name_longer_than_a_file_name(tmp_path: Path, home: Path) -> None:
    write(tmp_path, "long.dlm", f"---\ndlm_id: {ID}\nbase_model: {'b' * 300}\n---\nx\n")
    proc = dlm("doctor", "long.dlm", cwd=tmp_path)
    refused(proc, home, where="long.dlm:3:1", message="base_model cannot be a path here")


@pytest.mark.parametrize("args", [["doctor", "--nope"], ["twin"], ["train-all"], ["doctor", "--probe"]])
def test_usage_errors_exit_2_without_traceback(tmp_path: Path, home: Path, args: list[str]) -> None:
    proc = dlm(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "Error" in proc.stderr and not any(home.iterdir())
