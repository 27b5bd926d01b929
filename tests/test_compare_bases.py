"""`dlm compare` scores each adapter on the base as it was trained (`infer.trained_load`): a QLoRA
adapter on the 4-bit weights it learned against, dequantized, not on the original weights; twins
trained on different loads (LoRA in fp32 against QLoRA) each on their own, with a note. Real LoRA
and QLoRA runs (bitsandbytes on the CPU) of the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dlm.use import compare as cmp
from tests.test_compare import ID_A, ID_B, check_shape, tiny_doc


@pytest.fixture(scope="module")
def lora_and_qlora(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A: LoRA in fp32; B: its QLoRA twin (nf4, double quantisation, fp32 compute)."""
    from dlm.train import device, runs

    home = tmp_path_factory.mktemp("bases-home")
    a, b = tiny_doc(workdir, "lora.dlm", ID_A, "lora"), tiny_doc(workdir, "qlora.dlm", ID_B, "qlora")
    for doc in (a, b):  # no learning report: these tests judge losses only
        doc.write_text(doc.read_text().replace("  eval_fraction: 0.25\n", "  eval_fraction: 0.25\n  report: 0\n"))
        assert runs.train_document(doc, home, device.probe()).summary.status == "ok"
    return home, a, b


def summary(home: Path, dlm_id: str) -> dict:
    return json.loads((home / "store" / dlm_id / "versions" / "v0001" / "summary.json").read_text())


@pytest.mark.integration
def test_a_qlora_adapter_is_scored_on_the_dequantized_4bit_base(lora_and_qlora, tmp_path: Path) -> None:
    """Its loss is the one training measured with bitsandbytes' 4-bit layers; on the original weights
    (what compare did before) it is not."""
    from dlm.store import current
    from dlm.train import basefolder
    from dlm.use import infer

    home, a, b = lora_and_qlora
    cur = current.current(b, home)
    held = cmp.trained_split(cur)[1]
    base = basefolder.materialize(cur.prepared.base, home)
    trained = summary(home, ID_B)
    scores = infer.score_adapters(base, {"B": cur.version_dir}, held, max_length=64)
    assert scores["loads"] == {"base": "float32+nf4", "B": "float32+nf4"}
    assert scores["loss"]["B"] == pytest.approx(trained["eval_loss"], rel=1e-6)
    assert scores["loss"]["base"] == pytest.approx(trained["base_eval_loss"], rel=1e-6)
    # the same adapter on the full-precision base: its plan without the quantization
    plain = tmp_path / "plain"
    shutil.copytree(cur.version_dir, plain)
    plan = json.loads((plain / "plan.json").read_text())
    plan["model_kwargs"]["quantization"] = None
    (plain / "plan.json").write_text(json.dumps(plan))
    old = infer.score_adapters(base, {"B": plain}, held, max_length=64)
    assert old["loads"]["B"] == "float32"
    assert abs(old["loss"]["B"] - trained["eval_loss"]) > 1e-4  # measurably off: 4-bit rounding matters
    assert abs(old["loss"]["B"] - trained["eval_loss"]) > 100 * abs(scores["loss"]["B"] - trained["eval_loss"])


@pytest.mark.integration
def test_lora_against_qlora_scores_each_on_its_own_base_with_a_note(lora_and_qlora) -> None:
    home, a, b = lora_and_qlora
    c = cmp.compare(a, b, home, metric="eval_loss", min_gain=0.0)
    sa, sb = summary(home, ID_A), summary(home, ID_B)
    assert (c.base.scored_on, c.a.scored_on, c.b.scored_on) == ("float32", "float32", "float32+nf4")
    assert c.a.eval_loss == pytest.approx(sa["eval_loss"], rel=1e-6)
    assert c.b.eval_loss == pytest.approx(sb["eval_loss"], rel=1e-6)
    # the base row is the base as A (LoRA, fp32) was trained, not B's dequantized one
    assert c.base.eval_loss == pytest.approx(sa["base_eval_loss"], rel=1e-6)
    assert abs(c.base.eval_loss - sb["base_eval_loss"]) > 1e-4
    (note,) = [n for n in c.notes if "different bases" in n]
    assert "A on float32, B on float32+nf4" in note and "base row is the base as A was trained" in note
    assert c.b.delta_kl > 0 and c.verdict.gain_low is not None  # B's KL from its own base; an interval
    data = c.to_json()
    check_shape(data)
    assert data["sides"]["B"]["scored_on"] == "float32+nf4" and note in data["notes"]


@pytest.mark.integration
def test_loads_that_tokenize_differently_are_refused(workdir: Path, tmp_path: Path) -> None:
    """Two loads (fp32, bf16) whose adapters bring different tokenizers would score different tokens:
    RunError, not two losses that do not compare. One load of both: one base, no error."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlm.errors import RunError
    from dlm.plan.corpus import Example
    from dlm.use import infer

    tiny = workdir / "tiny"
    folders = {}
    for name, dtype in (("A", "float32"), ("B", "bfloat16")):
        peft = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(tiny)), LoraConfig(r=2, target_modules="all-linear")
        )
        peft.save_pretrained(str(tmp_path / name))
        (tmp_path / name / "plan.json").write_text(json.dumps({"model_kwargs": {"dtype": dtype, "quantization": None}}))
        folders[name] = tmp_path / name
    tok = AutoTokenizer.from_pretrained(str(tiny))
    tok.add_tokens(["catalogue number 7."])  # B's saved tokenizer reads its example as fewer tokens
    tok.save_pretrained(str(folders["B"]))
    held = [
        Example("q1", "instruction", "doc.dlm", 1, prompt="What is item 1?", completion="Item 1 is catalogue number 7.")
    ]
    with pytest.raises(RunError, match="tokenize the held-out examples differently"):
        infer.score_adapters(tiny, folders, held, max_length=64)
    (folders["B"] / "plan.json").write_text(json.dumps({"model_kwargs": {"dtype": "float32", "quantization": None}}))
    one = infer.score_adapters(tiny, folders, held, max_length=64)
    assert one["loads"] == {"base": "float32", "A": "float32", "B": "float32"} and one["tokens"] > 0
