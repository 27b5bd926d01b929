"""The document grammar: frontmatter with positions, fences, sections, data files, hashes, errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dlm.doc.datafiles import read_doc
from dlm.doc.frontmatter import MAX_DEPTH
from dlm.doc.grammar import parse_doc
from dlm.doc.schema import parse_spec
from dlm.doc.text import MAX_BYTES
from dlm.errors import DlmError, DlmErrors

ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"
FRONT = f"""---
dlm_id: {ID}
dlm_version: 1
base_model: smollm2-135m
training:
  adapter: dora
  lora_r: 8
  learning_rate: 2e-4
  target_modules: [q_proj, v_proj]
---
"""  # 10 lines: the body starts on line 11


def doc(body: str, front: str = FRONT, path: str = "t.dlm"):
    return parse_doc(front + body, path)


def error(text: str, path: str = "t.dlm") -> DlmError:
    with pytest.raises(DlmError) as info:
        parse_doc(text, path)
    return info.value


def write(folder: Path, name: str, content: str | bytes) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


# ---------------------------------------------------------------- frontmatter


def test_frontmatter_values_and_positions_of_nested_keys() -> None:
    d = doc("Prose.\n")
    assert d.frontmatter["training"]["lora_r"] == 8
    assert d.frontmatter["training"]["target_modules"] == ["q_proj", "v_proj"]
    assert d.positions[()] == (1, 1)
    assert d.positions[("dlm_id",)] == (2, 1)
    assert d.positions[("training",)] == (5, 1)
    assert d.positions[("training", "lora_r")] == (7, 3)
    assert d.positions[("training", "target_modules", 1)] == (9, 28)
    assert d.body_line == 11


def test_positions_of_list_items_in_block_style() -> None:
    d = doc("x\n", front=f"---\ndlm_id: {ID}\ndata:\n  - a.jsonl\n  -   b.md\n---\n")
    assert d.frontmatter["data"] == ["a.jsonl", "b.md"]
    assert d.positions[("data", 0)] == (4, 5)
    assert d.positions[("data", 1)] == (5, 7)


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("2e-5", 2e-5),
        ("1E3", 1000.0),
        ("-3.5e+2", -350.0),
        (".5e3", 500.0),
        ("2.0e-4", 2e-4),
        ("'2e-5'", "2e-5"),
        ('"1E3"', "1E3"),
        ("!!str 2e-5", "2e-5"),
        ("12", 12),
        ("1e", "1e"),
        ("e5", "e5"),
    ],
)
def test_yaml_11_scientific_numbers_plain_only(written: str, value: object) -> None:
    d = doc("x\n", front=f"---\ndlm_id: {ID}\nv: {written}\n---\n")
    assert d.frontmatter["v"] == value
    assert type(d.frontmatter["v"]) is type(value)


def test_scientific_learning_rate_reaches_the_spec_as_a_number() -> None:
    d = doc("Prose.\n")
    assert d.frontmatter["training"]["learning_rate"] == pytest.approx(2e-4)
    assert parse_spec(d.frontmatter, d.positions, d.path).training.learning_rate == pytest.approx(2e-4)


def test_merge_keys_explicit_keys_win() -> None:
    front = f"---\ndlm_id: {ID}\nbase: &b {{lora_r: 4, lora_alpha: 8}}\ntraining:\n  <<: *b\n  lora_r: 16\n---\n"
    d = doc("x\n", front=front)
    assert d.frontmatter["training"] == {"lora_r": 16, "lora_alpha": 8}
    assert d.positions[("training", "lora_r")] == (6, 3)
    assert d.positions[("training", "lora_alpha")] == (3, 22)  # where the merged value was written


def test_comment_only_frontmatter_is_an_empty_mapping() -> None:
    d = doc("x\n", front="---\n# nothing yet\n---\n")
    assert d.frontmatter == {}
    with pytest.raises(DlmErrors) as info:
        parse_spec(d.frontmatter, d.positions, d.path)
    assert "dlm_id" in info.value.message


@pytest.mark.parametrize(
    ("front", "line", "col", "words"),
    [
        (f"---\ndlm_id: {ID}\ndlm_id: {ID}\n---\n", 3, 1, "duplicate key 'dlm_id' (first set on line 2)"),
        ("---\ntraining:\n  lora_r: 8\n  lora_r: 9\n---\n", 4, 3, "duplicate key 'lora_r'"),
        ("---\ntraining:\n\tlora_r: 8\n---\n", 3, 1, "tab"),
        ("---\na: b: c\n---\n", 2, 5, "mapping values are not allowed"),
        ("---\n- a\n- b\n---\n", 2, 1, "must be a mapping"),
        ("---\njust text\n---\n", 2, 1, "must be a mapping"),
        ("---\n1: x\n---\n", 2, 1, "key '1' is read as int"),
        ("---\nyes: x\n---\n", 2, 1, "read as bool"),
        ("---\na: !!python/object/apply:os.system [ls]\n---\n", 2, 4, "unsupported YAML tag"),
        ("---\na: !!python/name:os.system\n---\n", 2, 4, "constructor"),
        ("---\na: *nope\n---\n", 2, 4, "alias"),
        ("---\na: 2001-13-45\n---\n", 2, 4, "cannot read the value"),
        ('---\na: "open\nb: 1\n---\n', 2, 4, "invalid YAML"),
        ("---\na: 1\n", 1, 1, "never closed"),
        ("# Title\n", 1, 1, "first line must be '---'"),
        ("---\na: &x [*x]\n---\n", 2, 4, f"deeper than {MAX_DEPTH}"),
        ("---\na: " + "[" * 25 + "]" * 25 + "\n---\n", 2, 23, f"deeper than {MAX_DEPTH}"),
    ],
)
def test_frontmatter_errors_point_at_the_offending_place(front: str, line: int, col: int, words: str) -> None:
    e = error(front + "Body.\n")
    assert (e.path, e.line, e.col) == ("t.dlm", line, col), e.render()
    assert words in e.message
    assert e.hint


def test_alias_bomb_is_refused_at_the_key_that_explodes() -> None:
    rows = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        rows.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 10) + "]")
    e = error("---\n" + "\n".join(rows) + "\n---\nx\n")
    assert "expands to more than 10,000" in e.message
    assert (e.line, e.col) == (5, 1)  # d: 1 + 10 * (1 + 10 * (1 + 10 * 11)) nodes crosses the bound
    assert "alias bomb" in e.hint


def test_moderate_alias_use_is_fine() -> None:
    d = doc("x\n", front=f"---\ndlm_id: {ID}\nm: &m [q_proj, v_proj]\ntraining:\n  target_modules: *m\n---\n")
    assert d.frontmatter["training"]["target_modules"] == ["q_proj", "v_proj"]


# ---------------------------------------------------------------- text handling


def test_crlf_lone_cr_and_bom_parse_and_hash_like_lf() -> None:
    text = FRONT + "# T\n\n::instruction::\n### Q\nq?\n### A\na.\n"
    plain = parse_doc(text, "t.dlm")
    for variant in (text.replace("\n", "\r\n"), text.replace("\n", "\r"), "\ufeff" + text.replace("\n", "\r\n")):
        d = parse_doc(variant, "t.dlm")
        assert d.frontmatter == plain.frontmatter
        assert d.positions == plain.positions
        assert d.sections == plain.sections
        assert d.sha256 == plain.sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_crlf_file_on_disk_reports_lf_line_numbers(tmp_path: Path) -> None:
    p = write(tmp_path, "c.dlm", (FRONT + "x\n::bogus::\n").replace("\n", "\r\n").encode())
    with pytest.raises(DlmError) as info:
        read_doc(p)
    assert (info.value.line, info.value.col) == (12, 1)


@pytest.mark.parametrize(
    ("raw", "line", "col"),
    [(b"---\nab\xffc\n", 2, 3), (b"\xef\xbb\xbf---\r\n\r\nx\xc3", 3, 2), (b"caf\xe9", 1, 4), (b"ok\rok\r\x80", 3, 1)],
)
def test_invalid_utf8_points_at_the_first_bad_byte(tmp_path: Path, raw: bytes, line: int, col: int) -> None:
    p = write(tmp_path, "u.dlm", raw)
    with pytest.raises(DlmError) as info:
        read_doc(p)
    assert "UTF-8" in info.value.message
    assert (info.value.path, info.value.line, info.value.col) == (str(p), line, col)


def test_empty_whitespace_binary_and_surrogate_text_are_refused() -> None:
    assert "empty" in error("").message
    assert "empty" in error(" \n\t\n").message
    e = error(FRONT + "ab\0c\n")
    assert "binary" in e.message and (e.line, e.col) == (11, 3)
    e = error(FRONT + "x\ud800\n")
    assert (e.line, e.col) == (11, 2)


def test_file_size_limit(tmp_path: Path) -> None:
    p = write(tmp_path, "big.dlm", FRONT.encode() + b"x" * (MAX_BYTES - len(FRONT) + 1))
    with pytest.raises(DlmError) as info:
        read_doc(p)
    assert "larger than 8 MiB" in info.value.message
    p.write_bytes(p.read_bytes()[:MAX_BYTES])  # exactly at the limit is accepted
    assert read_doc(p).sections[0].kind == "prose"


def test_missing_file_and_folder_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DlmError, match="no such file"):
        read_doc(tmp_path / "nope.dlm")
    with pytest.raises(DlmError, match="folder"):
        read_doc(tmp_path)


# ---------------------------------------------------------------- body


def test_every_section_kind_with_lines() -> None:
    body = (
        "# Title\n\nLeading prose.\n\n"  # 11-14
        "::instruction::\n### Q\nWhat?\n### A\nThis.\nTwo lines.\n\n### Q\nAnd?\n### A\nThat.\n"  # 15-25
        "  ::prose::  \nMiddle prose.\n"  # 26-27
        "::preference::\n### Prompt\nP\n### Chosen\nC\n### Rejected\nR\n"  # 28-34
    )
    d = doc(body)
    kinds = [(s.kind, s.line) for s in d.sections]
    assert kinds == [("prose", 11), ("instruction", 15), ("prose", 26), ("preference", 28)]
    prose, inst, middle, pref = d.sections
    assert prose.text == "# Title\n\nLeading prose."
    assert [(p.question, p.answer, p.line) for p in inst.pairs] == [
        ("What?", "This.\nTwo lines.", 16),
        ("And?", "That.", 22),
    ]
    assert middle.text == "Middle prose."
    assert [(t.prompt, t.chosen, t.rejected, t.line) for t in pref.triples] == [("P", "C", "R", 29)]
    assert all(s.path == "t.dlm" and not s.heldout for s in d.sections)


def test_heldout_marker_and_whitespace_tolerance() -> None:
    body = "::instruction heldout::\n###  Q \nq\n ### A\na\n\t::prose\theldout::\nkept back\n::instruction::\n### Q\nq2\n### A\na2\n"
    d = doc(body)
    assert [(s.kind, s.heldout) for s in d.sections] == [("instruction", True), ("prose", True), ("instruction", False)]


def test_empty_prose_yields_no_section() -> None:
    d = doc("\n   \n::prose::\n\n::instruction::\n### Q\nq\n### A\na\n::prose::\n")
    assert [s.kind for s in d.sections] == ["instruction"]
    assert doc("").sections == ()


def test_fences_and_headers_inside_code_blocks_are_inert() -> None:
    body = (
        "Prose with code:\n"
        "```markdown\n::instruction::\n### Q\n::not a fence::\n```\n"
        "~~~~\n~~~\n::prose::\n~~~~\n"  # a shorter ~~~ does not close a ~~~~ block
        "````\n```\nstill code\n```\n::preference::\n````\n"
        "::instruction::\n### Q\nShow a heading in Markdown.\n### A\n```\n### Q\n### A\n```\nThat is how.\n"
    )
    d = doc(body)
    assert [s.kind for s in d.sections] == ["prose", "instruction"]
    assert "::instruction::" in d.sections[0].text and "::preference::" in d.sections[0].text
    (pair,) = d.sections[1].pairs
    assert pair.answer == "```\n### Q\n### A\n```\nThat is how."


def test_inline_triple_backticks_do_not_open_a_block() -> None:
    d = doc("Use ```x``` inline.\n```py```\n::instruction::\n### Q\nq\n### A\na\n")
    assert [s.kind for s in d.sections] == ["prose", "instruction"]


def test_indented_code_fence_in_a_list_item_is_still_code() -> None:
    d = doc("- step one\n\n    ```\n    ::instruction::\n    ```\n")
    assert [s.kind for s in d.sections] == ["prose"]


@pytest.mark.parametrize(
    ("body", "line", "col", "words", "hint"),
    [
        ("x\n::instrucion::\n", 12, 1, "unknown fence '::instrucion::'", "did you mean '::instruction::'?"),
        ("  ::Instruction::\n", 11, 3, "unknown fence", "did you mean '::instruction::'?"),
        ("::instruction extra::\n", 11, 1, "unknown marker 'extra'", "did you mean '::instruction::'?"),
        ("::preference holdout::\n", 11, 1, "unknown marker 'holdout'", "did you mean '::preference heldout::'?"),
        (":: prose ::\n", 11, 1, "unknown fence", "did you mean '::prose::'?"),
        ("::note::\n", 11, 1, "unknown fence '::note::'", "code block"),
        ("::::\n", 11, 1, "unknown fence", "fences are"),
        ("::instruction::\n### Q\nq\n", 12, 1, "this '### Q' has no '### A'", "in that order"),
        ("::instruction::\n### Q\nq\n### Q\nq2\n### A\na\n", 12, 1, "has no '### A'", "in that order"),
        ("::instruction::\n### A\na\n", 12, 1, "'### A' without a '### Q'", "in that order"),
        ("::instruction::\n### Q\nq\n### A\na\n### A\nb\n", 16, 1, "without a '### Q'", "in that order"),
        ("::instruction::\n### Q\n\n### A\na\n", 12, 1, "empty '### Q'", "under '### Q'"),
        ("::instruction::\n### Q\nq\n### A\n \n::prose::\n", 14, 1, "empty '### A'", "under '### A'"),
        ("::instruction::\n\nintro\n### Q\nq\n### A\na\n", 13, 1, "text before the first '### Q'", "::prose::"),
        ("::instruction::\n\n", 11, 1, "empty ::instruction:: section", "### Q / ### A"),
        ("::instruction::\n### Q\nq\n### Answer\na\n", 14, 1, "not a section header", "did you mean '### A'?"),
        ("::instruction::\n## Q\nq\n", 12, 1, "not a section header", "did you mean '### Q'?"),
        ("::instruction::\n### Prompt\nq\n", 12, 1, "belongs in a ::preference:: section", "### Q / ### A"),
        ("::preference::\n### Prompt\np\n### Rejected\nr\n", 14, 1, "expected '### Chosen' here", "in that order"),
        ("::preference::\n### Prompt\np\n### Chosen\nc\n", 12, 1, "has no '### Rejected'", "in that order"),
        ("::preference::\n### Chosen\nc\n", 12, 1, "'### Chosen' without a '### Prompt'", "in that order"),
        ("::preference::\n", 11, 1, "empty ::preference:: section", "### Prompt"),
        ("ok\n~~~\n::instruction::\n", 12, 1, "code block opened with ~~~ is never closed", "at least 3 '~'"),
        ("::instruction::\n### Q\n```\n### A\nx\n", 13, 1, "never closed", "'`'"),
    ],
)
def test_body_errors_point_at_the_offending_line(body: str, line: int, col: int, words: str, hint: str) -> None:
    e = error(FRONT + body)
    assert (e.path, e.line, e.col) == ("t.dlm", line, col), e.render()
    assert words in e.message
    assert hint in (e.hint or "")


def test_prose_headings_that_look_like_headers_are_fine_outside_sections() -> None:
    d = doc("### Q\nA heading in prose.\n### Answer\n")
    assert d.sections[0].text == "### Q\nA heading in prose.\n### Answer"


# ---------------------------------------------------------------- standalone specs


def test_standalone_yaml_has_no_offset_and_no_body() -> None:
    text = f"dlm_id: {ID}\ntraining:\n  lora_r: 4\n---\n"  # a trailing `---` is just YAML's document marker
    with pytest.raises(DlmError):
        parse_doc(text + "x: 1\n", "s.yaml")  # a second document is refused
    d = parse_doc(f"dlm_id: {ID}\ntraining:\n  lora_r: 4\n", "s.yml")
    assert d.positions[("training", "lora_r")] == (3, 3)
    assert d.sections == ()
    e = error(f"dlm_id: {ID}\ntraining:\n  lora_r: [1\n", "s.yaml")
    assert (e.line, e.col) == (3, 11)


def test_standalone_yaml_reads_data(tmp_path: Path) -> None:
    write(tmp_path, "rows.jsonl", '{"text": "hello"}\n')
    spec = write(tmp_path, "s.yaml", f"dlm_id: {ID}\ndata: [rows.jsonl]\n")
    d = read_doc(spec)
    assert [(s.kind, s.text, s.path) for s in d.sections] == [("prose", "hello", str(tmp_path / "rows.jsonl"))]


# ---------------------------------------------------------------- data files


def data_doc(folder: Path, *items: str, body: str = "Body prose.\n") -> Path:
    listed = "".join(f"  - {i}\n" for i in items)
    return write(folder, "d.dlm", f"---\ndlm_id: {ID}\ndata:\n{listed}---\n{body}")


def test_jsonl_shapes(tmp_path: Path) -> None:
    rows = [
        {"text": "Plain prose."},
        {"prompt": "P?", "completion": "C.", "heldout": True},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "U2"},
                {"role": "assistant", "content": "A2"},
            ]
        },
        {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}], "heldout": False},
    ]
    write(
        tmp_path,
        "data/rows.jsonl",
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]),
    )
    d = read_doc(data_doc(tmp_path, "data/rows.jsonl"))
    shown = str(tmp_path / "data/rows.jsonl")
    body, text, pc, multi, single = d.sections
    assert body.kind == "prose" and body.path == str(tmp_path / "d.dlm")
    assert (text.kind, text.text, text.line, text.path, text.heldout) == ("prose", "Plain prose.", 1, shown, False)
    assert (pc.kind, pc.line, pc.heldout) == ("instruction", 2, True)
    assert [(p.question, p.answer, p.line) for p in pc.pairs] == [("P?", "C.", 2)]
    assert multi.line == 4 and multi.system == "Be brief."  # the blank line 3 is skipped, not renumbered
    assert [(p.question, p.answer) for p in multi.pairs] == [("U1", "A1"), ("U2", "A2")]
    assert single.system is None and not single.heldout
    assert d.data_files == (shown,)


def test_md_txt_and_dlm_data_files(tmp_path: Path) -> None:
    write(tmp_path, "notes.md", "# Notes\r\n\r\nSome notes.\r\n")
    write(tmp_path, "more.txt", "\ufeffplain text\n")
    write(
        tmp_path,
        "sub/other.dlm",
        "---\nanything: [goes, here]\ndata: [../missing.jsonl]\n---\n"
        "Intro.\n::instruction heldout::\n### Q\nq\n### A\na\n",
    )
    d = read_doc(data_doc(tmp_path, "notes.md", "more.txt", "sub/other.dlm"))
    texts = [(s.kind, s.text, s.line, s.heldout) for s in d.sections[1:]]
    assert texts == [
        ("prose", "# Notes\n\nSome notes.", 1, False),
        ("prose", "plain text", 1, False),
        ("prose", "Intro.", 5, False),
        ("instruction", "", 6, True),
    ]
    assert d.sections[-1].path == str(tmp_path / "sub/other.dlm")


def test_sha_covers_data_files(tmp_path: Path) -> None:
    rows = write(tmp_path, "rows.jsonl", '{"text": "one"}\n')
    p = data_doc(tmp_path, "rows.jsonl")
    first = read_doc(p).sha256
    assert read_doc(p).sha256 == first
    assert first != parse_doc(p.read_text(), str(p)).sha256  # the data file's bytes are part of it
    rows.write_text('{"text": "two"}\n')
    assert read_doc(p).sha256 != first


def test_data_paths_inside_the_folder_are_allowed(tmp_path: Path) -> None:
    write(tmp_path, "a/rows.jsonl", '{"text": "x"}\n')
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "a/rows.jsonl", tmp_path / "link.jsonl")
    d = read_doc(data_doc(tmp_path, "b/../a/rows.jsonl", "./link.jsonl"))
    assert len(d.sections) == 3


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("../outside.jsonl", "outside the document's folder"),
        ("/etc/hosts.jsonl", "absolute"),
        ("~/x.jsonl", "absolute"),
        ("escape.jsonl", "outside the document's folder"),
        ("gone.jsonl", "not found"),
        ("notes.csv", "unsupported"),
        ("folder.jsonl", "not a file"),
        ("''", "not a usable data path"),
    ],
)
def test_data_path_policy_errors_point_at_the_item(tmp_path: Path, item: str, words: str) -> None:
    doc_dir = tmp_path / "doc"
    write(tmp_path, "outside.jsonl", '{"text": "secret"}\n')
    write(doc_dir, "notes.csv", "a,b\n")
    (doc_dir / "folder.jsonl").mkdir()
    os.symlink(tmp_path / "outside.jsonl", doc_dir / "escape.jsonl")  # a link out is refused too
    p = data_doc(doc_dir, "ok.jsonl", item)
    write(doc_dir, "ok.jsonl", '{"text": "fine"}\n')
    with pytest.raises(DlmError) as info:
        read_doc(p)
    e = info.value
    assert (e.path, e.line, e.col) == (str(p), 5, 5), e.render()
    assert words in e.message
    assert e.hint


@pytest.mark.parametrize(
    ("content", "line", "col", "words"),
    [
        ('{"text": "a"}\n{"text": "b",}\n', 2, 14, "malformed JSON"),
        ('{"text": "a"}\n\n\n   [1, 2]\n', 4, 4, "not an object"),
        ('{"text": 3}\n', 1, 2, "'text' must be a string"),
        ('{"text": "  "}\n', 1, 2, "'text' is empty"),
        ('{"prompt": "p"}\n', 1, 2, "has 'prompt' but no 'completion'"),
        ('{"completion": "c"}\n', 1, 2, "has 'completion' but no 'prompt'"),
        ('{"text": "t", "prompt": "p", "completion": "c"}\n', 1, 1, "mixes shapes"),
        ('{"heldout": true}\n', 1, 1, "has no text"),
        ('{"prompt": "p", "answer": "c"}\n', 1, 17, "unknown key 'answer'"),
        ('{"text": "t", "heldout": "yes"}\n', 1, 15, "'heldout' must be true or false"),
        ('{"messages": []}\n', 1, 2, "non-empty list"),
        ('{"messages": [{"role": "user"}]}\n', 1, 2, "exactly 'role' and 'content'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', 1, 2, "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": 1}]}\n', 1, 2, "messages[0].content must be a string"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}\n', 1, 2, "messages[0] is a assistant message"),
        (
            '{"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]}\n',
            1,
            2,
            "messages[1] is a system",
        ),
        ('{"messages": [{"role": "system", "content": "s"}]}\n', 1, 2, "does not end with an assistant reply"),
        ("", 1, 1, "empty"),
        ("\n\n", 1, 1, "empty"),
        (b'{"text": "\xff"}\n', 1, 11, "not valid UTF-8"),
        ('{"n": ' + "9" * 5000 + "}\n", 1, 1, "unreadable JSON"),
    ],
)
def test_jsonl_errors_name_the_file_row_and_column(
    tmp_path: Path, content: str | bytes, line: int, col: int, words: str
) -> None:
    rows = write(tmp_path, "rows.jsonl", content)
    with pytest.raises(DlmError) as info:
        read_doc(data_doc(tmp_path, "rows.jsonl"))
    e = info.value
    assert (e.path, e.line, e.col) == (str(rows), line, col), e.render()
    assert words in e.message
    assert e.hint


def test_errors_inside_a_dlm_data_file_name_that_file(tmp_path: Path) -> None:
    other = write(tmp_path, "other.dlm", "---\n---\n::prose::\n::weird::\n")
    with pytest.raises(DlmError) as info:
        read_doc(data_doc(tmp_path, "other.dlm"))
    assert (info.value.path, info.value.line) == (str(other), 4)
    write(tmp_path, "bare.dlm", "---\nx: 1\n---\n\n")
    with pytest.raises(DlmError, match="no body"):
        read_doc(data_doc(tmp_path, "bare.dlm"))


@pytest.mark.parametrize("data", ["rows.jsonl", "[1, 2]", "{a: b}", "[rows.jsonl, 3]"])
def test_data_that_is_not_a_list_of_strings_is_left_to_the_schema(tmp_path: Path, data: str) -> None:
    p = write(tmp_path, "d.dlm", f"---\ndlm_id: {ID}\ndata: {data}\n---\nx\n")
    d = read_doc(p)  # nothing is read, nothing crashes
    assert d.data_files == ()
    with pytest.raises(DlmErrors) as info:
        parse_spec(d.frontmatter, d.positions, d.path)
    assert info.value.line == 3


# ---------------------------------------------------------------- schema errors land on the key's line


def test_schema_errors_use_the_key_positions(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "s.dlm",
        f"---\ndlm_id: {ID}\ndlm_version: 16\ntraining:\n  lora_rank: 8\n"
        "  lora_dropout: 1.5\n  target_modules:\n    - q_proj\n    - 7\n---\nx\n",
    )
    d = read_doc(p)
    with pytest.raises(DlmErrors) as info:
        parse_spec(d.frontmatter, d.positions, d.path)
    where = {(e.line, e.col): e.message for e in info.value.errors}
    assert "newer" in where[(3, 1)]
    assert "lora_rank" in where[(5, 3)]
    assert "lora_dropout" in where[(6, 3)]
    assert "target_modules" in where[(9, 7)]  # the bad list item itself


# ---------------------------------------------------------------- robustness


def test_random_text_only_ever_raises_dlm_errors() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    pieces = st.sampled_from(
        [
            "---\n",
            "::instruction::\n",
            "::prose heldout::\n",
            "### Q\n",
            "### A\n",
            "```\n",
            "~~~~\n",
            "a: 1\n",
            "a: &x [*x]\n",
            "<<: *x\n",
            "\t",
            ": ",
            "- ",
            "\r",
            "\ufeff",
            "\0",
            "é",
            "[",
            "{",
            "'",
        ]
    )
    texts = st.lists(st.one_of(pieces, st.text(max_size=8)), max_size=30).map("".join)

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(text=texts, path=st.sampled_from(["f.dlm", "f.yaml"]))
    def check(text: str, path: str) -> None:
        try:
            parse_doc(text, path)
        except DlmError as e:
            assert e.path == path and e.line is not None and e.line >= 1 and e.col is not None and e.col >= 1 and e.hint

    check()


@pytest.mark.parametrize("value", ["!!bool maybe", "!!timestamp x", "!!int x", "!!float nope", "2001-13-45"])
def test_a_value_an_explicit_tag_cannot_build_is_a_located_error(value: str) -> None:
    text = f"---\ndlm_id: {ID}\nbase_model: smollm2-135m\nsystem_prompt: {value}\n---\nbody\n"
    with pytest.raises(DlmError) as info:
        parse_doc(text, "t.dlm")
    assert (info.value.line, info.value.col) == (4, 16)
    assert "cannot read the value" in info.value.message or "invalid YAML" in info.value.message
