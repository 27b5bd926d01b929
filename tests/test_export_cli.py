"""`dlm export` through the real command line on a tiny trained document: every format's folder, the
greedy answer of the exported GGUF read back by transformers against `dlm prompt`'s, the model card,
the refusals (exit 2, nothing written) and an interrupted export that leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_commands import dlm, write_doc

pytestmark = pytest.mark.integration
QUESTION = "What is item 3?"


@pytest.fixture(scope="module")
def trained(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    home = tmp_path_factory.mktemp("home")
    doc = write_doc(workdir, "export.dlm", steps=4)
    dlm("train", doc.name, home=home, cwd=workdir)
    return doc, home


def _card(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_ollama_folder_answers_as_dlm_prompt(trained, workdir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dlm.train.rows import render_chat

    doc, home = trained
    out = tmp_path / "out"
    proc = dlm("export", doc.name, "--format", "ollama", "--quant", "f32", "-o", str(out), home=home, cwd=workdir)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model.gguf"]
    assert f"ollama create export -f {out / 'Modelfile'}" in proc.stdout.replace("\n", "")
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """Answer briefly."""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    meta = _card(out)
    assert meta["library_name"] == "gguf" and meta["dlm"]["adapter"] == "lora" and meta["dlm"]["quant"] == "f32"
    assert meta["dlm"]["reason"].startswith("reason: ") and meta["dlm"]["metrics"]["eval_loss"] > 0
    assert len(meta["dlm"]["data_sha256"]) == 64
    # the file, read by an independent reader, answers greedily as `dlm prompt --temperature 0` does
    args = ("prompt", doc.name, QUESTION, "--max-tokens", "8", "--temperature", "0", "--json")
    answer = json.loads(dlm(*args, home=home, cwd=workdir).stdout)["answers"][0]["adapter"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(workdir / "tiny"))
    head = render_chat(tok, QUESTION, None, "Answer briefly.")[0]
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf").eval()
    ids = tok(text=head, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id)
    text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text == answer


def test_gguf_q8_0_reports_its_measured_agreement(trained, workdir: Path, tmp_path: Path) -> None:
    doc, home = trained
    out = tmp_path / "q8"
    proc = dlm("export", doc.name, "--format", "gguf", "--quant", "q8_0", "-o", str(out), home=home, cwd=workdir)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.gguf"]
    assert "info export-quant-lossy" in proc.stderr and "positions of the document's held-out examples" in proc.stderr
    assert "ollama create" not in proc.stdout


def test_peft_folder_is_the_adapter_alone(trained, workdir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    doc, home = trained
    out = tmp_path / "peft"
    proc = dlm("export", doc.name, "--format", "peft", "-o", str(out), home=home, cwd=workdir)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert not names & {"spec.json", "plan.json", "summary.json", "files.json", "log.jsonl"}
    assert "dora-not-vllm-servable" not in proc.stderr  # a LoRA adapter: vLLM serves it
    assert _card(out)["library_name"] == "peft"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(workdir / "tiny")), str(out))
    assert "default" in model.peft_config


def test_hf_folder_has_a_card(trained, workdir: Path, tmp_path: Path) -> None:
    doc, home = trained
    out = tmp_path / "hf"
    dlm("export", doc.name, "-o", str(out), home=home, cwd=workdir)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert _card(out)["library_name"] == "transformers"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--format", "gguf", "--quant", "q4_k_m"], "llama-quantize"),
        (["--format", "hf", "--quant", "q8_0"], "--quant applies to"),
        (["--format", "safetensors"], "--format must be one of"),
        (["--format", "gguf", "--dtype", "bfloat16"], "--dtype applies to"),
    ],
)
def test_bad_options_are_refused_before_anything(trained, workdir: Path, tmp_path: Path, args, says) -> None:
    doc, home = trained
    out = tmp_path / "never"
    proc = dlm("export", doc.name, *args, "-o", str(out), home=home, cwd=workdir, check=2)
    assert says in proc.stderr and "hint:" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_refused(trained, workdir: Path, tmp_path: Path) -> None:
    doc, home = trained
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = dlm("export", doc.name, "--format", "gguf", "-o", str(out), home=home, cwd=workdir, check=2)
    assert "not empty" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_an_interrupted_export_leaves_nothing(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after the GGUF file is written, while the Modelfile is: no folder under the final name,
    no temp folder beside it."""
    from dlm.store import current
    from dlm.use import cards
    from dlm.use import export as exporting

    doc, home = trained
    monkeypatch.chdir(doc.parent)
    cur = current.current(doc.name, home)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cards, "modelfile", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        exporting.export(cur, home, "ollama", out)
    assert list(tmp_path.iterdir()) == []


def test_the_documents_export_block_sets_quant_and_sampling(workdir: Path, tmp_path: Path) -> None:
    """`export:` (DocumentLanguageModel's block): its quant is the default `--quant`, refused before
    anything loads when dlm cannot write it (a k-quant), and its sampling goes into the Modelfile."""
    home = tmp_path / "home"
    extra = "export:\n  quant: Q4_K_M\n  temperature: 0.7\n  top_p: 0.9\n"
    doc = write_doc(workdir, "exported.dlm", steps=2, extra=extra)
    dlm("train", doc.name, home=home, cwd=workdir)
    out = tmp_path / "k"
    proc = dlm("export", doc.name, "--format", "ollama", "-o", str(out), home=home, cwd=workdir, check=2)
    line = 1 + doc.read_text().splitlines().index("  quant: Q4_K_M")
    assert f"exported.dlm:{line}:" in proc.stderr and "export.quant Q4_K_M" in proc.stderr
    assert "llama-quantize model.gguf model-Q4_K_M.gguf Q4_K_M" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    out = tmp_path / "f32"
    dlm("export", doc.name, "--format", "ollama", "--quant", "f32", "-o", str(out), home=home, cwd=workdir)
    modelfile = (out / "Modelfile").read_text()
    assert "PARAMETER temperature 0.7\n" in modelfile and "PARAMETER top_p 0.9\n" in modelfile
    assert _card(out)["dlm"]["quant"] == "f32"
