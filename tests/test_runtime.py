"""A real runtime (`make test-runtime`): llama.cpp, through its Python binding built from source, runs
the GGUF that `dlm export` wrote for the trained tutor and answers trained questions greedily with
the same text as `dlm prompt --temperature 0`.

Not in `make test`: building llama-cpp-python from its sdist takes minutes (docs/export.md has the
time measured here), and the tutor must be trained (`make demo`; trained here when it is not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS

pytestmark = pytest.mark.runtime
DLM = str(Path(sys.executable).with_name("dlm"))
TUTOR = CONFIGS / "tutor.dlm"
QUESTIONS = ["What is a decorator?", "What does `yield` do in a function?"]


def _dlm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([DLM, *args], capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def test_llama_cpp_answers_as_dlm_prompt(tmp_path: Path) -> None:
    from llama_cpp import Llama  # built from source by `make test-runtime`
    from transformers import AutoTokenizer

    from dlm.train.rows import render_chat

    info = json.loads(_dlm("show", str(TUTOR), "--json").stdout)
    if info["current"] is None or info["stale"]:
        _dlm("train", str(TUTOR))  # ~4 min on 2 CPU cores, as in `make demo`
    out = tmp_path / "out"
    _dlm("export", str(TUTOR), "--format", "gguf", "--quant", "f16", "-o", str(out))
    proc = subprocess.run(  # `dlm prompt -` reads one question per line from stdin
        [DLM, "prompt", str(TUTOR), "-", "--json", "--temperature", "0", "--max-tokens", "64"],
        input="\n".join(QUESTIONS) + "\n",
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    expected = {a["question"]: a["adapter"] for a in json.loads(proc.stdout)["answers"]}
    system = "You are a concise Python tutor. Answer in one or two sentences."
    tok = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    llm = Llama(model_path=str(out / "model.gguf"), n_ctx=512, n_threads=2, verbose=False, seed=0)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    assert llm.token_eos() == tok.convert_tokens_to_ids("<|im_end|>")
    for q in QUESTIONS:
        head = render_chat(tok, q, None, system)[0]
        ids = tok(text=head)["input_ids"]
        assert llm.tokenize(head.encode("utf-8"), add_bos=False, special=True) == ids  # llama.cpp's own BPE
        got = llm.create_completion(ids, max_tokens=64, temperature=0.0, top_k=1, stop=["<|im_end|>"])
        assert got["choices"][0]["text"].strip() == expected[q], (q, got["choices"][0]["text"], expected[q])
