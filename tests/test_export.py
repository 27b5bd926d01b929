"""GGUF export proven by an independent reader: the tiny Llama with a LoRA merged in, written at each
quant, read back with transformers' GGUF loader and compared with the merged model on the same
prompts; the chat template, special and end-of-turn tokens survive the round trip. The Modelfile's
template is held against the tokenizer's own chat template; the model card's metadata parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlm.plan.findings import GGUF_QUANTS
from dlm.use import cards
from dlm.use.gguf_file import _rope_rows, gguf_tensor_name, pre_tokenizer_name

pytestmark = pytest.mark.integration

QUESTIONS = ["What is item 3?", "Name the capital of France.", "Explain LoRA in one line.", "12 + 30 = ?"]
# Largest |logit difference| allowed against the merged fp32 model (the tiny model's logits reach ~0.8).
# f32 is bit-exact; measured maxima: f16 9.0e-4, bf16 6.0e-3, q8_0 1.8e-2 (tiny model, these prompts).
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2}
Q8_0_MIN_AGREEMENT = 0.97  # greedy next token, teacher-forced; measured 95/95 positions on the tiny model


@pytest.fixture(scope="module")
def merged(workdir: Path):
    """The tiny base with a random (non-zero) LoRA on every linear layer, merged; and its tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(workdir / "tiny"))
    base = AutoModelForCausalLM.from_pretrained(str(workdir / "tiny"))
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return peft_model.merge_and_unload().eval(), tok


def _heads(tok) -> list[str]:
    from dlm.train.rows import render_chat

    return [render_chat(tok, q, None, "Answer briefly.")[0] for q in QUESTIONS]


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_gguf_round_trip_through_transformers(merged, tmp_path: Path, quant: str) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlm.use.gguf_file import write_gguf

    model, tok = merged
    path = tmp_path / "model.gguf"
    info = write_gguf(model, tok, path, quant=quant, name="tiny", end_of_turn=("<|im_end|>",))
    assert info["tensors"] == 2 * 9 + 2  # 9 per block, embeddings and the final norm; lm_head tied
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    # the tokenizer is the same in every file: read back (~10 s on 2 cores) once
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name) if quant == "f32" else tok
    same = total = 0
    worst = 0.0
    for head in _heads(tok):
        ids = tok(text=head, return_tensors="pt")["input_ids"]
        assert back_tok(text=head)["input_ids"] == ids[0].tolist()  # the tokenizer survives
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, back(input_ids=ids).logits
        worst = max(worst, (a - b).abs().max().item())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[1]
    if quant in TOLERANCE:
        assert worst <= TOLERANCE[quant], (quant, worst)
        assert same == total
    else:
        assert same / total >= Q8_0_MIN_AGREEMENT, (same, total)
        assert worst > 0  # it really is quantised
    # the chat template and the stop tokens, in the file and through the reader
    assert back_tok.chat_template == tok.chat_template
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert back_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    assert (back_tok.eos_token, back_tok.bos_token) == (tok.eos_token, tok.bos_token)
    fields = GGUFReader(str(path)).fields
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert fields["general.file_type"].contents() == info["file_type"]
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[im_end] == 3 and types[1000] == 1  # CONTROL for the chat markers, NORMAL for text


def test_rope_rows_match_the_reader_inverse() -> None:
    """Our q/k row order is exactly what transformers' GGUF reader undoes (its inverse is public)."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of dim 8, 3 inputs
    proc = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    assert not np.array_equal(_rope_rows(w, 6), w)
    assert np.array_equal(proc._reverse_permute_weights(_rope_rows(w, 6), 6, 6), w)
    assert np.array_equal(proc._reverse_permute_weights(_rope_rows(w[:16], 2), 6, 2), w[:16])


def test_tensor_names_and_pre_tokenizers() -> None:
    assert gguf_tensor_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_tensor_name("model.layers.0.self_attn.k_proj.bias") == "blk.0.attn_k.bias"
    assert gguf_tensor_name("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
    assert gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_tensor_name("lm_head.weight") is None
    from dlm.errors import DlmError

    with pytest.raises(DlmError, match="does not know"):
        gguf_tensor_name("model.layers.0.block_sparse_moe.gate.weight")
    digits = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
    }
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}) == "gpt-2"
    llama3 = {"type": "Split", "pattern": {"Regex": "(?i:'s|'t)|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"}}
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [llama3]}}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_modelfile_template_lays_out_conversations_as_the_chat_template(merged) -> None:
    _, tok = merged
    conversations = [
        ("Answer briefly.", [{"role": "user", "content": "What is item 3?"}]),
        (
            "Be kind.",
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and?"},
            ],
        ),
    ]
    for system, messages in conversations:
        full = [{"role": "system", "content": system}, *messages]
        want = tok.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
        assert cards.chatml_render(system, messages) == want
    default = cards.template_default_system(tok)
    assert default and "SmolLM" in default  # what the template writes when a conversation has no system
    no_system = tok.apply_chat_template(conversations[0][1], tokenize=False, add_generation_prompt=True)
    assert cards.chatml_render(default, conversations[0][1]) == no_system
    text = cards.modelfile(tok, "model.gguf", None)
    assert text.startswith("FROM ./model.gguf\n")
    assert f'SYSTEM """{default}"""' in text  # no system_prompt: the template's default, as in training
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text
    assert cards.CHATML_TEMPLATE in text and "{{ .System }}" in text and "range .Messages" in text
    assert 'SYSTEM """Answer briefly."""' in cards.modelfile(tok, "model.gguf", "Answer briefly.")


def test_model_card_front_matter_parses() -> None:
    facts = cards.CardFacts(
        name="notes",
        source="notes.dlm",
        base_model="smollm2-135m",
        base_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        adapter="dora",
        version="v0002",
        doc_sha256="a" * 64,
        corpus_sha256="b" * 64,
        reason="reason: precision=fp32, adapter=dora",
        metrics={"steps": 40, "eval_loss": 1.5, "base_eval_loss": 2.5, "train_loss": 1.2},
        learning={"train": {"n": 3, "f1": 0.8, "answers": [{"q": "x"}]}, "line": "learned: 3/3", "answers": []},
        system_prompt="Answer briefly.",
    )
    text = cards.model_card(facts, "gguf", ["model.gguf"], quant="q8_0")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "gguf"
    assert meta["dlm"]["adapter"] == "dora" and meta["dlm"]["data_sha256"] == "b" * 64
    assert meta["dlm"]["reason"].startswith("reason: ") and meta["dlm"]["quant"] == "q8_0"
    assert meta["dlm"]["metrics"]["eval_loss"] == 1.5 and meta["dlm"]["learning"] == {
        "train": {"n": 3, "f1": 0.8},  # the scores; the per-question answers stay in the store
        "line": "learned: 3/3",
    }
    assert "dlm_version" in meta["dlm"] and "held-out loss: 1.5000 (base: 2.5000)" in text
    assert "- learned: 3/3" in text


def test_export_findings_trigger_and_near_miss() -> None:
    from dlm.plan.findings import GGUF_ARCHS, export_findings

    def codes(*args, **kwargs) -> list[str]:
        return [f.code for f in export_findings(*args, **kwargs)]

    # gguf-arch-unsupported: a GGUF of an architecture the writer does not know; near miss: mistral
    # (written as llama), and the same base exported as a Hugging Face folder
    (block,) = export_findings("ollama", "f16", "gemma2", False)
    assert (block.level, block.code) == ("block", "gguf-arch-unsupported")
    assert block.evidence["supported"] == sorted(GGUF_ARCHS) and "llama" in block.message
    assert codes("gguf", "f16", "mistral", False) == [] and codes("hf", None, "gemma2", False) == []
    # dora-not-vllm-servable: the PEFT folder of a DoRA adapter; near misses: LoRA, or DoRA merged
    (info,) = export_findings("peft", None, "llama", True)
    assert info.level == "info" and info.code == "dora-not-vllm-servable" and "vllm #10849" in info.message
    assert codes("peft", None, "llama", False) == [] and codes("gguf", "f16", "llama", True) == []
    # export-quant-lossy: q8_0 with its measured agreement; near miss: f16, and q8_0 before measuring
    (lossy,) = export_findings("gguf", "q8_0", "llama", False, (93, 95))
    assert lossy.level == "info" and lossy.code == "export-quant-lossy" and "93 of 95" in lossy.message
    assert lossy.evidence == {"quant": "q8_0", "agree": 93, "positions": 95}
    assert codes("gguf", "f16", "llama", False, (95, 95)) == [] and codes("gguf", "q8_0", "llama", False) == []


def _logits(model, tok):
    import torch

    ids = tok(text=_heads(tok)[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dora_merges_exactly(workdir: Path, tmp_path: Path) -> None:
    """A DoRA adapter (random B, magnitudes moved off the weight norms) merged by `load_trained`
    answers as the unmerged adapter does."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlm.use.infer import load_trained

    tok = AutoTokenizer.from_pretrained(str(workdir / "tiny"))
    torch.manual_seed(2)
    dora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(workdir / "tiny")),
        LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False),
    )
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    dora.save_pretrained(str(tmp_path / "dora"))
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(workdir / "tiny")), str(tmp_path / "dora")
    )
    merged, _ = load_trained(tmp_path / "dora", workdir / "tiny", dtype="float32", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(str(workdir / "tiny")).eval()
    a, b = _logits(unmerged.eval(), tok), _logits(merged, tok)
    assert (a - b).abs().max().item() < 1e-5
    assert (a - _logits(base, tok)).abs().max().item() > 1e-3  # the adapter does change the answers


def test_qlora_merges_into_the_dequantized_4bit_base(workdir: Path, tmp_path: Path) -> None:
    """The weights a QLoRA adapter merges into are the ones bitsandbytes' 4-bit layers computed with in
    training (nf4, double quantisation), dequantized: not the full-precision originals."""
    import json

    import torch
    from bitsandbytes import functional as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dlm.use.infer import dequantized_as_trained, trained_load

    settings = {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32",
    }
    four_bit = AutoModelForCausalLM.from_pretrained(
        str(workdir / "tiny"), quantization_config=BitsAndBytesConfig(**settings), device_map="cpu"
    )
    ours = AutoModelForCausalLM.from_pretrained(str(workdir / "tiny"))
    original = ours.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert dequantized_as_trained(ours, settings) == 2 * 7  # every block linear; not the head
    mine = dict(ours.named_modules())
    compared = 0
    for name, module in four_bit.named_modules():
        if type(module).__name__ == "Linear4bit":
            trained_on = bnb.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.equal(mine[name].weight, trained_on), name
            compared += 1
    assert compared == 14
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.weight, original)
    # what the store records is what `prompt` and `export` load with
    (tmp_path / "plan.json").write_text(json.dumps({"model_kwargs": {"dtype": "bfloat16", "quantization": settings}}))
    assert trained_load(tmp_path) == ("bfloat16", settings)
    assert trained_load(tmp_path / "missing") == ("auto", None)


def test_preflight_refuses_what_the_writer_cannot_hold_before_weights_load(workdir: Path, tmp_path: Path) -> None:
    """From the JSON files alone: rope scaling, a SentencePiece-style tokenizer, a non-ChatML template
    for Ollama; the tiny base (plain rope, byte-level BPE, ChatML) passes for both formats."""
    import json
    import shutil

    from dlm.errors import DlmError
    from dlm.use.gguf_file import preflight

    tiny = workdir / "tiny"
    preflight(tiny, tmp_path, ollama=True)  # near miss: nothing to refuse
    base = tmp_path / "base"
    shutil.copytree(tiny, base, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((base / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "factor": 32.0, "rope_theta": 500000.0}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(DlmError, match="rope scaling 'llama3'"):
        preflight(base, tmp_path, ollama=False)
    shutil.copy2(tiny / "config.json", base / "config.json")
    tok = json.loads((base / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True
    (base / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DlmError, match="SentencePiece"):
        preflight(base, tmp_path, ollama=False)
    shutil.copy2(tiny / "tokenizer.json", base / "tokenizer.json")
    (base / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    preflight(base, tmp_path, ollama=False)  # gguf carries any Jinja template
    with pytest.raises(DlmError, match="ChatML"):
        preflight(base, tmp_path, ollama=True)
