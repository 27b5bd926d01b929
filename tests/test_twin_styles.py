"""`dlm twin` edits flow-style mappings (`training: {adapter: lora}`) as it edits block style, and a
twin that would not validate names the original document, never the copy it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm.doc.authoring import make_twin
from dlm.doc.schema import load_spec
from dlm.errors import DlmError
from tests.test_bad_input import dlm, refused, tree

HEAD = "---\ndlm_id: 01JC8Z3T6V7W8X9Y0Z1A2B3C4D\ndlm_version: 1\nbase_model: smollm2-135m   # the base\n"
BODY = "---\n# T\n\n::instruction::\n### Q\nWhat?\n### A\nThis.\n"


def _doc(tmp_path: Path, training: str, name: str = "f.dlm") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + training + BODY)
    return path


def _training(path: Path) -> dict:
    _, spec = load_spec(path)
    return spec.training.model_dump()


@pytest.mark.parametrize(
    "training",
    [
        "training: {adapter: lora, lora_r: 8}   # flow\n",
        "training:\n  adapter: lora   # block\n  lora_r: 8\n",
        "training: {\n  adapter: lora,\n  lora_r: 8\n}\n",
    ],
    ids=["flow", "block", "flow-multiline"],
)
def test_twin_edits_flow_and_block_style_alike(tmp_path: Path, training: str) -> None:
    src = _doc(tmp_path, training)
    out = make_twin(
        src,
        ["training.adapter=dora", "training.lora_dropout=0.05", "training.target_modules=[q_proj, v_proj]"],
        tmp_path / "g.dlm",
    )
    t = _training(out)
    assert (t["adapter"], t["lora_r"], t["lora_dropout"], t["target_modules"]) == (
        "dora",
        8,
        0.05,
        ["q_proj", "v_proj"],
    )
    text = out.read_text()
    assert "# the base" in text and text.count("training") == 1  # comments kept, no second `training:`
    assert text.split("\n---\n", 1)[1] == src.read_text().split("\n---\n", 1)[1]  # the body untouched


def test_flow_values_are_quoted_for_flow_context(tmp_path: Path) -> None:
    """A comma or brace in a value would end a flow item: the twin quotes it and reads back exactly."""
    src = _doc(tmp_path, "system_prompt: hi\ntraining: {adapter: lora}\n")
    out = make_twin(src, ["training.learning_rate=2e-4", "system_prompt=Be brief, always {ok}"], tmp_path / "g.dlm")
    _, spec = load_spec(out)
    assert spec.system_prompt == "Be brief, always {ok}"
    assert spec.training.learning_rate == pytest.approx(2e-4)


def test_empty_flow_mapping_gets_the_key(tmp_path: Path) -> None:
    src = _doc(tmp_path, "training: {}\n")
    out = make_twin(src, ["training.adapter=dora", "training.lora_r=4"], tmp_path / "g.dlm")
    assert "training: {adapter: dora, lora_r: 4}" in out.read_text()


def test_several_inserted_keys_stay_inside_the_frontmatter(tmp_path: Path) -> None:
    src = _doc(tmp_path, "training:\n  adapter: lora\n")
    out = make_twin(
        src, ["training.lora_r=4", "training.lora_alpha=8", "system_prompt=Short answers."], tmp_path / "g.dlm"
    )
    _, spec = load_spec(out)
    assert (spec.training.lora_r, spec.training.lora_alpha, spec.system_prompt) == (4, 8, "Short answers.")


def test_a_section_written_as_a_scalar_is_refused(tmp_path: Path) -> None:
    src = _doc(tmp_path, "system_prompt: hi\n")
    with pytest.raises(DlmError, match="not written as a mapping"):
        make_twin(src, ["system_prompt.x=1"], tmp_path / "g.dlm")
    assert not (tmp_path / "g.dlm").exists()


def test_an_invalid_twin_names_the_original_and_writes_nothing(tmp_path: Path, home: Path) -> None:
    _doc(tmp_path, "training: {adapter: lora}\n")
    before = tree(tmp_path)
    proc = dlm("twin", "f.dlm", "--set", "training.adapter=dorra", "-o", "g.dlm", cwd=tmp_path)
    refused(proc, home, message="was not written", located=False)
    first = proc.stderr.splitlines()[0]
    assert first.startswith("f.dlm: ") and "g.dlm was not written" in first and "'adapter'" in first
    assert tree(tmp_path) == before
