"""Documents in DocumentLanguageModel's format (tests/original/*.dlm, written for these tests): read,
refused, migrated; the bases table; `dlm pull` against a fake local cache (nothing downloads)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlm.doc.grammar import parse_doc
from dlm.doc.migrate import migrate_text
from dlm.doc.schema import load_spec
from dlm.errors import DlmError, DlmErrors
from dlm.plan import bases
from dlm.plan.bases import ALIASES, resolve
from dlm.plan.corpus import examples, split
from dlm.plan.hardware import load_fixture
from dlm.plan.prepare import prepare
from tests.conftest import FIXTURES

ORIGINAL = Path(__file__).resolve().parent / "original"
ID = "01JC8Z3T6V7W8X9Y0Z1A2B3C4D"
HW = FIXTURES / "hardware" / "cpu.json"


def dlm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copy(ORIGINAL / name, tmp_path / name))


def errors_of(exc: DlmError) -> list[DlmError]:
    return exc.errors if isinstance(exc, DlmErrors) else [exc]


# ---------------------------------------------------------------- reading


def test_gallery_document_reads_with_its_export_block_and_optimizer() -> None:
    _, spec = load_spec(ORIGINAL / "gallery.dlm")
    assert spec.dlm_version == 15
    assert (spec.export.quant, spec.export.temperature, spec.export.top_p) == ("Q4_K_M", 0.7, 0.9)
    assert spec.training.optimizer == "adamw_8bit"  # adamw_bnb_8bit, under TRL's name
    assert spec.training.precision == "auto"  # their null


def test_provenance_comments_are_not_training_text() -> None:
    doc, spec = load_spec(ORIGINAL / "gallery.dlm")
    texts = [e.text + e.prompt + e.completion for e in examples(doc, spec.system_prompt)]
    assert any("harvested from notes" in t for t in texts)
    assert not any("dlm-auto" in t or "<!--" in t for t in texts)


def test_probe_pairs_are_pinned_to_the_heldout_set() -> None:
    doc, spec = load_spec(ORIGINAL / "gallery.dlm")
    train, heldout = split(examples(doc, spec.system_prompt), spec.training.seed, spec.training.eval_fraction)
    assert [e.prompt for e in heldout] == ["Which stage comes last?"]
    assert {"How many stages does the build have?", "What comes first?"} <= {e.prompt for e in train}


def test_probe_first_and_hub_prefix() -> None:
    doc, spec = load_spec(ORIGINAL / "hub.dlm")
    assert spec.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    pinned = [(p.question, s.heldout) for s in doc.sections if s.kind == "instruction" for p in s.pairs]
    assert pinned == [("A probe first?", True), ("And a trained pair?", False)]


def test_a_probe_mark_on_an_answer_is_not_a_header() -> None:
    text = f"---\ndlm_id: {ID}\n---\n::instruction::\n### Q\nq\n### A !probe\na\n"
    with pytest.raises(DlmError):
        parse_doc(text, "x.dlm")


def test_acceptance_doctor_plans_the_gallery_document_offline(tmp_path: Path) -> None:
    doc = copy(tmp_path, "gallery.dlm")
    proc = dlm(
        "doctor", "--json", doc.name, cwd=tmp_path, env={"DLM_HOME": str(tmp_path / "h"), "HF_HOME": str(tmp_path)}
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["files"][0]
    assert report["base"]["name"] == "qwen2.5-coder-1.5b"
    assert report["base"]["location"] == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    found = {f["code"]: f for f in report["plan"]["findings"]}
    assert found["original-format"]["level"] == "info"
    assert found["original-format"]["evidence"] == {"dlm_version": 15}
    assert report["corpus"]["n_pinned"] == 1


def test_the_finding_is_for_their_versions_only(tmp_path: Path) -> None:
    hw = load_fixture(HW)
    assert "original-format" in [f.code for f in prepare(ORIGINAL / "gallery.dlm", hw).plan.findings]
    ours = tmp_path / "ours.dlm"
    ours.write_text((ORIGINAL / "gallery.dlm").read_text().replace("dlm_version: 15", "dlm_version: 1"))
    assert "original-format" not in [f.code for f in prepare(ours, hw).plan.findings]


@pytest.mark.parametrize("version", [16, 99])
def test_a_version_past_the_original_formats_is_refused(tmp_path: Path, version: int) -> None:
    p = tmp_path / "v.dlm"
    p.write_text(f"---\ndlm_id: {ID}\ndlm_version: {version}\n---\nx\n")
    with pytest.raises(DlmError) as info:
        load_spec(p)
    (err,) = errors_of(info.value)
    assert (err.line, "newer" in err.message, "2 to 15" in (err.hint or "")) == (3, True, True)


@pytest.mark.parametrize(
    ("export", "key"),
    [("default_temperature: 0", "temperature"), ("default_top_p: 1.5", "top_p"), ("default_quant: Q3_K", "quant")],
)
def test_export_defaults_are_validated_at_their_line(tmp_path: Path, export: str, key: str) -> None:
    p = tmp_path / "e.dlm"
    p.write_text(f"---\ndlm_id: {ID}\ndlm_version: 15\nexport:\n  default_quant: Q8_0\n  {export}\n---\nx\n")
    if export.startswith("default_quant"):  # the same key twice is a YAML error of its own; use ours
        p.write_text(f"---\ndlm_id: {ID}\ndlm_version: 15\nexport:\n  {export}\n---\nx\n")
    with pytest.raises(DlmError) as info:
        load_spec(p)
    (err,) = errors_of(info.value)
    assert f"'default_{key}'" in err.message and err.line in (5, 6)  # the name the document wrote


def test_export_near_miss_our_own_names_read() -> None:
    doc = parse_doc(f"---\ndlm_id: {ID}\nexport: {{quant: Q8_0, temperature: 2, top_p: 1}}\n---\nx\n", "x.dlm")
    from dlm.doc.schema import parse_spec

    spec = parse_spec(doc.frontmatter, doc.positions, doc.path)
    assert (spec.export.quant, spec.export.temperature, spec.export.top_p) == ("Q8_0", 2, 1)


def test_adapters_are_refused_at_their_line_with_the_fence_suffix(tmp_path: Path) -> None:
    doc = copy(tmp_path, "adapters.dlm")
    home = tmp_path / "h"
    home.mkdir()
    proc = dlm("doctor", doc.name, cwd=tmp_path, env={"DLM_HOME": str(home)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("adapters.dlm:6:3: ") and "named adapters" in lines[0]
    assert any(line.startswith("adapters.dlm:12:1: ") and "'#knowledge'" in line for line in lines)
    assert lines[1].startswith("hint: ") and "one adapter per document" in lines[1]
    assert not any(home.iterdir())


def test_every_unsupported_feature_is_named_in_one_report() -> None:
    with pytest.raises(DlmErrors) as info:
        load_spec(ORIGINAL / "everything.dlm")
    got = {(e.line, e.col): e.message for e in info.value.errors}
    expected = {
        (6, 3): "unknown key 'lora_rank'",
        (7, 3): "training.gate",
        (9, 3): "training.cpt",
        (11, 3): "training.audio",
        (13, 3): "training.cache",
        (15, 3): "training.dpo",
        (17, 3): "training.preference",
        (20, 3): "'default_quant'",
        (24, 1): "image sections",
        (26, 1): "audio sections",
        (29, 1): "'### Q'",
    }
    assert set(got) == set(expected), got
    for where, words in expected.items():
        assert words in got[where], (where, got[where])
    assert all(e.hint for e in info.value.errors)


def test_grammar_schema_and_base_errors_come_together(tmp_path: Path) -> None:
    p = tmp_path / "three.dlm"
    p.write_text(
        f"---\ndlm_id: {ID}\nbase_model: no-such-base\ntraining:\n  lora_r: 0\n---\n"
        "::instruction::\n### Q\nq\n::instrucion::\ntext\n::instruction::\n### Q\nq\n### A\na\n"
    )
    with pytest.raises(DlmErrors) as info:
        prepare(p, load_fixture(HW))
    got = [(e.line, e.message.split(" ")[0]) for e in info.value.errors]
    assert [line for line, _ in got] == [3, 5, 8, 10], got
    assert "unknown base_model" in info.value.errors[0].message
    assert "lora_r" in info.value.errors[1].message
    assert "no '### A'" in info.value.errors[2].message
    assert "unknown fence" in info.value.errors[3].message


def test_a_yaml_error_and_a_body_error_come_together(tmp_path: Path) -> None:
    p = tmp_path / "two.dlm"
    p.write_text(f"---\ndlm_id: {ID}\ntraining: [\n---\n::instruction::\n### A\na\n")
    with pytest.raises(DlmErrors) as info:
        load_spec(p)
    first, second = info.value.errors
    assert first.message.startswith("invalid YAML") and first.line in (3, 4)
    assert (second.line, "without a '### Q'" in second.message) == (6, True)


def test_a_good_document_near_miss_raises_nothing(tmp_path: Path) -> None:
    p = tmp_path / "ok.dlm"
    p.write_text(f"---\ndlm_id: {ID}\n---\n<!-- an ordinary comment stays -->\n::instruction::\n### Q\nq\n### A\na\n")
    doc, _ = load_spec(p)
    assert doc.problems == () and "ordinary comment" in doc.sections[0].text


# ---------------------------------------------------------------- dlm migrate


def test_migrate_rewrites_in_place_keeps_comments_and_a_backup(tmp_path: Path) -> None:
    doc = copy(tmp_path, "gallery.dlm")
    before = doc.read_bytes()
    old_doc, old_spec = load_spec(doc)
    old = [(e.prompt, e.text, e.pinned_heldout) for e in examples(old_doc, old_spec.system_prompt)]
    proc = dlm("migrate", doc.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for change in ("dlm_version 15 -> 1", "export.default_quant -> export.quant", "adamw_bnb_8bit -> adamw_8bit"):
        assert change in proc.stdout
    assert "gallery.dlm:4: dlm_version 15 -> 1" in proc.stdout  # file:line of each change
    assert (tmp_path / "gallery.dlm.bak").read_bytes() == before
    text = doc.read_text()
    assert "# A gallery template as DocumentLanguageModel writes it" in text
    assert "quant: Q4_K_M   # what `ollama create` gets" in text
    assert "!probe" not in text and "::instruction heldout::" in text
    new_doc, new_spec = load_spec(doc)
    assert new_spec.dlm_version == 1 and new_spec.export.quant == "Q4_K_M"
    assert new_spec.training.optimizer == "adamw_8bit" and new_spec.training.precision == "auto"
    new = [(e.prompt, e.text, e.pinned_heldout) for e in examples(new_doc, new_spec.system_prompt)]
    assert sorted(new) == sorted(old)  # the same examples, the probe still held out
    again = dlm("migrate", doc.name, cwd=tmp_path)
    assert again.returncode == 0 and "nothing to change" in again.stdout


def test_migrate_a_leading_probe_and_hub_prefix() -> None:
    text = (ORIGINAL / "hub.dlm").read_text()
    new, changes = migrate_text(text, "hub.dlm")
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct\n" in new
    assert "::instruction heldout::\n### Q\nA probe first?" in new
    assert "### A\nYes.\n::instruction::\n### Q\nAnd a trained pair?" in new
    assert len(changes) == 3


def test_migrate_dry_run_writes_nothing(tmp_path: Path) -> None:
    doc = copy(tmp_path, "gallery.dlm")
    before = doc.read_bytes()
    proc = dlm("migrate", "--dry-run", doc.name, cwd=tmp_path)
    assert proc.returncode == 0 and "dry run" in proc.stdout, proc.stderr
    assert doc.read_bytes() == before and not (tmp_path / "gallery.dlm.bak").exists()


def test_migrate_refuses_what_cannot_be_mapped(tmp_path: Path) -> None:
    doc = copy(tmp_path, "adapters.dlm")
    before = doc.read_bytes()
    proc = dlm("migrate", doc.name, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("adapters.dlm:6:3: ") and "#knowledge" in proc.stderr
    assert doc.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapters.dlm"]


def test_migrate_keeps_an_existing_backup(tmp_path: Path) -> None:
    doc = copy(tmp_path, "gallery.dlm")
    (tmp_path / "gallery.dlm.bak").write_text("mine")
    proc = dlm("migrate", doc.name, cwd=tmp_path)
    assert proc.returncode == 2 and "exists already" in proc.stderr
    assert (tmp_path / "gallery.dlm.bak").read_text() == "mine"
    assert "dlm_version: 15" in doc.read_text()


# ---------------------------------------------------------------- bases and dlm pull

PUBLISHED = {  # parameter counts from the model cards / safetensors metadata
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-3b": 3_085_938_688,
    "qwen2.5-coder-1.5b": 1_543_714_304,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "gemma-2-2b": 2_614_341_888,
    "phi-3.5-mini": 3_821_079_552,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


@pytest.mark.parametrize("alias", sorted(PUBLISHED))
def test_alias_facts_match_the_published_parameter_count(alias: str) -> None:
    facts = resolve(alias)
    assert abs(facts.n_params - PUBLISHED[alias]) / PUBLISHED[alias] < 0.001
    assert facts.attention_modules and set(facts.attention_modules) <= set(facts.linear_modules)


def test_phi_has_fused_projections_and_its_own_template() -> None:
    facts = resolve("phi-3.5-mini")
    assert facts.attention_modules == ("qkv_proj", "o_proj") and "gate_up_proj" in facts.linear_modules
    assert (facts.chat_family, facts.tie_embeddings) == ("phi3", False)


def fake_cache(root: Path, hub_id: str, commit: str = "c0ffee" * 6 + "abcd") -> Path:
    repo = root / "hub" / ("models--" + hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(ALIASES["qwen2.5-0.5b"].config))
    return snap


def test_pull_finds_a_cached_base_without_the_network(tmp_path: Path) -> None:
    snap = fake_cache(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct")
    env = {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": ""}
    proc = dlm("pull", "qwen2.5-0.5b", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"already in the cache: commit {snap.name}" in proc.stdout
    by_commit = dlm("pull", "hf:Qwen/Qwen2.5-0.5B-Instruct", "--revision", snap.name, cwd=tmp_path, env=env)
    assert by_commit.returncode == 0 and snap.name in by_commit.stdout, by_commit.stderr


def test_pull_offline_names_the_way_out(tmp_path: Path) -> None:
    proc = dlm("pull", "qwen2.5-1.5b", cwd=tmp_path, env={"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Qwen/Qwen2.5-1.5B-Instruct is not in the local Hugging Face cache" in proc.stderr
    assert "HF_HUB_OFFLINE" in proc.stderr and not (tmp_path / "hub").exists()


def test_pull_refuses_what_is_not_a_base_name(tmp_path: Path) -> None:
    proc = dlm("pull", "not a model", cwd=tmp_path, env={"HF_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "neither an alias" in proc.stderr


def test_training_an_uncached_alias_names_dlm_pull(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlm.train.basefolder import materialize

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(DlmError) as info:
        materialize(resolve("qwen2.5-1.5b"), tmp_path / "home")
    assert "dlm pull qwen2.5-1.5b" in (info.value.hint or "")
    snap = fake_cache(tmp_path, "Qwen/Qwen2.5-1.5B-Instruct")
    assert bases.cached_snapshot("Qwen/Qwen2.5-1.5B-Instruct") == snap  # the near miss: pulled, found


def test_a_run_records_the_resolved_commit_of_a_cached_base(workdir: Path, tmp_path: Path) -> None:
    from dlm.store.resume import run_shape

    doc = workdir / "rev.dlm"
    doc.write_text(f"---\ndlm_id: {ID}\nbase_model: ./tiny\n---\nSome prose to train on.\n")
    prepared = prepare(doc, load_fixture(HW))
    snap = tmp_path / "models--org--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(workdir / "tiny", snap)
    assert run_shape(prepared, snap)["base"]["revision"] == "0123abcd"
    assert run_shape(prepared, workdir / "tiny")["base"]["revision"] is None  # a plain folder has none


def test_migrate_a_standalone_spec(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(f"# a spec\ndlm_id: {ID}\ndlm_version: 12\nexport: {{default_top_p: 0.5}}\n")
    proc = dlm("migrate", spec.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert spec.read_text() == f"# a spec\ndlm_id: {ID}\ndlm_version: 1\nexport: {{top_p: 0.5}}\n"


def test_train_side_base_error_points_at_base_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlm.train.basefolder import materialize

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    doc = copy(tmp_path, "gallery.dlm")
    with pytest.raises(DlmError) as info:
        prepare(doc, load_fixture(HW), base_folder=lambda b: materialize(b, tmp_path / "home"))
    assert (info.value.path, info.value.line) == (str(doc), 5)
    assert "dlm pull qwen2.5-coder-1.5b" in (info.value.hint or "")


@pytest.mark.parametrize("value", ["[adamw_bnb_8bit]", "{a: 1}"])
def test_an_optimizer_that_is_not_a_name_is_a_schema_error(tmp_path: Path, value: str) -> None:
    # found by tests/test_fuzz.py: the mapping of adamw_bnb_8bit looked a list up in a dict
    p = tmp_path / "o.dlm"
    p.write_text(f"---\ndlm_id: {ID}\ndlm_version: 15\ntraining:\n  optimizer: {value}\n---\nx\n")
    with pytest.raises(DlmError) as info:
        load_spec(p)
    assert [e.line for e in errors_of(info.value)] == [5]
    with pytest.raises(DlmError):
        migrate_text(p.read_text(), str(p))


PREFERENCE_DOC = """---
dlm_id: {id}
dlm_version: 15
base_model: smollm2-135m
training:
  {key}:
{block}---
::preference::
### Prompt
How far is it?
### Chosen
It is 5 kilometres.
### Rejected
It is 3 miles.
"""


def _preference_spec(tmp_path: Path, block: str, key: str = "preference"):
    p = tmp_path / "pref.dlm"
    p.write_text(PREFERENCE_DOC.format(id=ID, key=key, block=block))
    return load_spec(p)[1]


@pytest.mark.parametrize("key", ["preference", "dpo"])
def test_the_original_preference_block_becomes_dlms_dpo(tmp_path: Path, key: str) -> None:
    block = (
        "    enabled: true\n    method: dpo\n    hyperparams:\n      beta: 0.2\n      alpha: 0.1\n"
        "      learning_rate: 5.0e-6\n      num_epochs: 2\n    loss_type: ipo\n    reference: pre_adapter\n"
    )
    t = _preference_spec(tmp_path, block, key).training
    assert t.objective == "dpo"
    p = t.preference
    assert (p.beta, p.learning_rate, p.num_epochs, p.loss_type, p.reference) == (0.2, 5e-6, 2, "ipo", "sft")


def test_the_original_preference_block_disabled_or_orpo(tmp_path: Path) -> None:
    t = _preference_spec(tmp_path, "    enabled: false\n    hyperparams:\n      beta: 0.5\n").training
    assert t.objective == "sft"  # no DPO phase, as that format's enabled: false
    with pytest.raises(DlmError) as info:
        _preference_spec(tmp_path, "    method: orpo\n")
    err = info.value
    assert (err.line, err.col) == (6, 3) and "method: orpo" in err.message and "dpo" in err.hint


def test_dlms_own_preference_block_is_left_alone(tmp_path: Path) -> None:
    t = _preference_spec(tmp_path, "    beta: 0.3\n    reference: base\n").training
    assert t.preference.beta == 0.3 and t.preference.reference == "base" and t.objective == "sft"
