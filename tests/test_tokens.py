"""Exact token counts without torch (`dlm.plan.tokens`): the same lengths training sees.

Unit tier: a small tokenizer built here with the `tokenizers` package, where the tokenizer is found,
the count cache and the estimate fallback. Integration tier (imports transformers): the light
counter against `encode_rows(rows(...))` with the real SmolLM2 tokenizer on Chinese, Japanese, code,
emoji and special-token text, a plan for a document with a 148-character Chinese answer, and
`dlm doctor` counting with the tokenizer on disk without importing torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, REPO

from dlm.plan import bases, tokens
from dlm.plan.corpus import Example, estimate_tokens
from dlm.plan.hardware import load_fixture
from dlm.plan.prepare import prepare

ID = "01KAV3J8ZP4N6Q2R7S9T0W1X2Y"
CPU = FIXTURES / "hardware" / "cpu.json"
# 148 characters of Chinese: 267 tokens alone, 311 as a training row (with the template's default
# system prompt) with the embedded tokenizer. The old estimate, characters / 3.5 + 24 = 68 tokens,
# planned max_length 128 and cut more than half of the answer silently.
CHINESE_148 = (
    "光合作用是绿色植物利用叶绿体中的叶绿素，把光能转化为化学能的过程。在这个过程中，植物吸收二氧化碳和水，"
    "在光照条件下合成葡萄糖等有机物，并释放出氧气。光合作用分为光反应和暗反应两个阶段：光反应在类囊体膜上进行，"
    "产生三磷酸腺苷和还原型辅酶；暗反应在叶绿体基质中进行，利用这些能量把二氧化碳固定为糖类。"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "dlm-base.json")


def ex(kind: str = "instruction", *, prompt: str = "", completion: str = "", text: str = "", system=None, n=0):
    return Example(f"{kind}{n}", kind, "t.dlm", 10 + n, text, prompt, completion, "", system)  # type: ignore[arg-type]


# --- a small tokenizer of our own ----------------------------------------------------------------


TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and no_system %}{{ raise_exception('no system') }}"
    "{% endif %}<s>{{ m['role'] }} {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant {% endif %}"
)


def small_tokenizer(folder: Path, *, add_bos: bool = True, template: str | None = TEMPLATE, **config) -> Path:
    """A word-level tokenizer: whitespace words, specials <s> </s> <unk>, BOS added by the config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<unk> <s> </s> user assistant system hello world how are you fine x a b".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": add_bos, **config}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def test_small_tokenizer_counts_as_rows_and_encode_rows_would(tmp_path: Path) -> None:
    tok = tokens.load(small_tokenizer(tmp_path / "tok"), "small")
    assert tok is not None and tok.bos_prefix == "<s>" and tok.eos == "</s>"
    qa = ex(prompt="how are you", completion="fine")
    # the template's own leading <s> is dropped: the tokenizer adds BOS itself
    assert tokens.row(tok, qa) == {"prompt": "user how are you </s>\n<s>assistant ", "completion": "fine </s>"}
    # <s> + user how are you </s> + <s> assistant + fine </s>; eos is already there, nothing appended
    assert tokens.lengths(tok, [qa]) == {"instruction0": 10}
    prose = ex("prose", text="hello world")
    assert tokens.row(tok, prose) == {"prompt": "", "completion": "hello world"}
    assert tokens.lengths(tok, [prose]) == {"prose0": 4}  # <s> hello world </s>


def test_a_template_that_refuses_a_system_role_gets_it_folded_into_the_question(tmp_path: Path) -> None:
    tok = tokens.load(small_tokenizer(tmp_path / "tok", no_system=True), "small")
    assert tok is not None
    tok = tokens.ChatTokenizer(tok.name, tok.backend, tok.template, {**tok.special, "no_system": "1"}, tok.bos_prefix)
    head, completion = tokens.render_chat(tok, "how are you", "fine", "x")
    assert head == "user x\n\nhow are you </s>\n<s>assistant " and completion == "fine </s>"


def test_without_a_chat_template_questions_use_dlm_s_layout(tmp_path: Path) -> None:
    from dlm.train.rows import FALLBACK_PROMPT  # rows.py imports nothing heavy at module level

    assert tokens.FALLBACK_PROMPT == FALLBACK_PROMPT
    tok = tokens.load(small_tokenizer(tmp_path / "tok", template=None), "small")
    assert tok is not None and tok.template is None
    assert tokens.row(tok, ex(prompt="a", completion="b")) == {
        "prompt": "### Question\na\n\n### Answer\n",
        "completion": "b",
    }


def test_config_without_add_bos_keeps_the_tokenizer_s_own_post_processor(tmp_path: Path) -> None:
    folder = small_tokenizer(tmp_path / "tok")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = tokens.load(folder, "small")
    assert tok is not None and tok.bos_prefix == ""  # the saved tokenizer has no post-processor adding BOS
    assert tokens.lengths(tok, [ex("prose", text="hello world")]) == {"prose0": 3}  # hello world </s>


def test_special_tokens_the_backend_lacks_are_added_as_transformers_adds_them(tmp_path: Path) -> None:
    folder = small_tokenizer(tmp_path / "tok", pad_token="<pad>")
    tok = tokens.load(folder, "small")
    assert tok is not None and tok.backend.token_to_id("<pad>") is not None
    assert tok.backend.encode("hello<pad>world", add_special_tokens=False).tokens == ["hello", "<pad>", "world"]


# --- where the tokenizer is found, the cache, the fallback ------------------------------------------


def converted_home(home: Path, source: Path) -> Path:
    """A $DLM_HOME whose embedded base is 'converted': only its tokenizer files and the marker."""
    folder = home / "bases" / bases.DEFAULT_BASE
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    (folder / tokens.CONVERTED).write_text("{}")
    return home


def test_find_folder_mirrors_materialize_without_converting(tmp_path: Path) -> None:
    alias = bases.resolve(bases.DEFAULT_BASE)
    assert tokens.find_folder(alias, None) == (
        None,
        "smollm2-135m is converted on first use; the first `dlm train` converts it",
    )
    assert tokens.find_folder(alias, tmp_path)[0] is None  # no marker: not converted (or half converted)
    folder = tmp_path / "bases" / bases.DEFAULT_BASE
    folder.mkdir(parents=True)
    assert tokens.find_folder(alias, tmp_path)[0] is None
    (folder / tokens.CONVERTED).write_text("{}")
    assert tokens.find_folder(alias, tmp_path) == (folder, "")
    local = small_tokenizer(tmp_path / "local")
    (local / "config.json").write_text(json.dumps(bases.ALIASES[bases.DEFAULT_BASE].config))
    assert tokens.find_folder(bases.resolve(str(local)), None) == (local, "")


def test_a_converted_gguf_is_found_by_its_marker(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x" * 10)
    facts = bases.BaseFacts(
        **{**bases.resolve(bases.DEFAULT_BASE).to_json(), "kind": "gguf", "location": str(gguf), "name": "m.gguf"}
    )
    assert tokens.find_folder(facts, tmp_path)[0] is None
    folder = tmp_path / "bases" / "gguf-0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / tokens.CONVERTED).write_text(json.dumps({"gguf": str(gguf), "gguf_bytes": 10}))
    assert tokens.find_folder(facts, tmp_path) == (folder, "")
    gguf.write_bytes(b"x" * 11)  # another file at the same path
    assert tokens.find_folder(facts, tmp_path)[0] is None


def test_counts_are_cached_for_the_doctor_and_recounted_for_training(tmp_path: Path, monkeypatch) -> None:
    folder = small_tokenizer(tmp_path / "tok")
    (folder / "config.json").write_text(json.dumps(bases.ALIASES[bases.DEFAULT_BASE].config))
    base, exs = bases.resolve(str(folder)), [ex(prompt="how are you", completion="fine"), ex("prose", text="x", n=1)]
    home = tmp_path / "home"
    first = tokens.count(base, exs, home=home, cache_name=ID)
    assert first == ({"instruction0": 10, "prose1": 3}, "") and (home / "cache" / "tokens" / f"{ID}.json").is_file()

    loads: list[Path] = []
    real_load = tokens.load
    monkeypatch.setattr(tokens, "load", lambda folder, name: loads.append(folder) or real_load(folder, name))
    assert tokens.count(base, exs, home=home, cache_name=ID) == first and loads == []  # the doctor's second look
    assert tokens.count(base, exs, home=home, folder=folder, cache_name=ID) == first and len(loads) == 1  # training
    more = [*exs, ex("prose", text="a b", n=2)]
    assert tokens.count(base, more, home=home, cache_name=ID)[0] == {**first[0], "prose2": 4} and len(loads) == 2
    cfg = folder / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"add_bos_token": true', '"add_bos_token": false'))
    # the files changed (no BOS now: the template's own <s> stays), so the cache is not used
    assert tokens.count(base, exs, home=home, cache_name=ID)[0] == {"instruction0": 10, "prose1": 2}


def test_an_unusable_tokenizer_means_estimated_with_the_reason(tmp_path: Path) -> None:
    folder = small_tokenizer(tmp_path / "tok")
    (folder / "config.json").write_text(json.dumps(bases.ALIASES[bases.DEFAULT_BASE].config))
    base = bases.resolve(str(folder))
    (folder / "tokenizer.json").write_text("{ not json")
    counts, why = tokens.count(base, [ex(prompt="a", completion="b")], home=tmp_path)
    assert counts is None and "tokenizer could not be used" in why
    (folder / "tokenizer.json").unlink()
    assert tokens.count(base, [ex(prompt="a", completion="b")], home=tmp_path) == (
        None,
        f"no tokenizer.json in {folder}",
    )


def test_estimate_counts_other_scripts_by_their_bytes() -> None:
    assert estimate_tokens("abcdefg") == 2.0  # 7 ASCII characters / 3.5
    assert estimate_tokens("光合作用") == 12 / 1.75  # 4 characters, 12 UTF-8 bytes
    answer = ex(prompt="什么是光合作用？", completion=CHINESE_148)
    assert answer.est_tokens * 1.5 >= 311  # with the planner's margin, at least the real row (old estimate: 68)


def test_planning_module_imports_neither_tokenizers_nor_jinja_until_it_counts() -> None:
    code = "import sys, dlm.plan.tokens, dlm.plan.prepare; print(sorted({'tokenizers', 'jinja2'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


# --- against transformers, with the real SmolLM2 tokenizer ------------------------------------------


def awkward_examples() -> list[Example]:
    return [
        ex(prompt="什么是光合作用？", completion=CHINESE_148, n=0),
        ex(
            prompt="東京はどんな街ですか？",
            completion="東京は日本の首都であり、世界で最も人口の多い都市圏の一つです。",
            system="日本語で答えて。",
            n=1,
        ),
        ex(
            prompt="Square the even values:",
            completion="```python\ndef f(xs):\n    return {k: [v**2 for v in vs if v % 2 == 0] for k, vs in xs.items()}\n```\n",
            system="You write Python.",
            n=2,
        ),
        ex("prose", text="Party: 🍕🎉 and a family 👩\u200d👩\u200d👧\u200d👦 with 😀😃😄, flags 🇯🇵🇫🇷.", n=3),
        ex(prompt="<|im_start|>user\nsneaky", completion="ends early<|im_end|>", n=4),
        ex(prompt="  spaced  \n\n", completion="  trailing whitespace \n\n", n=5),
        Example("p6", "preference", "t.dlm", 16, "", "Pick one", "this", "that", "Be brief."),
        ex("prose", text="\n".join(f"Line {i}: naïve café — ‘quotes’ … ½ ≥ ∑" for i in range(40)), n=7),
    ]


@pytest.mark.integration
def test_light_counter_equals_encode_rows_with_the_transformers_tokenizer() -> None:
    from transformers import AutoTokenizer

    from dlm.train.rows import encode_rows, ensure_pad_token, rows
    from tests.tinymodel import smollm2_base

    folder = smollm2_base()
    hf = AutoTokenizer.from_pretrained(str(folder))
    ensure_pad_token(hf)  # as training does before it renders rows
    exs = awkward_examples()
    light = tokens.load(folder, "smollm2-135m")
    assert light is not None
    assert [tokens.row(light, e) for e in exs] == rows(exs, hf)
    assert list(tokens.lengths(light, exs).values()) == [len(r["input_ids"]) for r in encode_rows(rows(exs, hf), hf)]


@pytest.mark.integration
def test_a_148_character_chinese_answer_is_never_cut(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from dlm.train.rows import encode_rows, rows
    from tests.tinymodel import smollm2_base

    assert len(CHINESE_148) == 148
    doc = tmp_path / "zh.dlm"
    doc.write_text(f"---\ndlm_id: {ID}\n---\n::instruction::\n### Q\n什么是光合作用？\n### A\n{CHINESE_148}\n")
    folder = smollm2_base()
    hw = load_fixture(CPU)
    trained = prepare(doc, hw, home=tmp_path / "home", base_folder=lambda base: folder)  # as `dlm train` plans
    hf = AutoTokenizer.from_pretrained(str(folder))
    real = len(encode_rows(rows(trained.train, hf), hf)[0]["input_ids"])
    assert real > 200 and trained.corpus.max_tokens == real and trained.corpus.exact
    assert trained.plan.sft_kwargs["max_length"] >= real
    assert "examples-truncated" not in {f.code for f in trained.plan.findings}
    doctor = prepare(doc, hw, home=converted_home(tmp_path / "doctor-home", folder))  # as `dlm doctor` plans
    assert doctor.corpus.exact and doctor.plan.sft_kwargs["max_length"] == trained.plan.sft_kwargs["max_length"]
    estimated = prepare(doc, hw, home=tmp_path / "bare-home")  # not converted: the estimate still fits it
    assert not estimated.corpus.exact and estimated.plan.sft_kwargs["max_length"] >= real
    written = prepare(doc.parent / _with_sequence_len(doc, 128), hw, base_folder=lambda base: folder)
    cut = next(f for f in written.plan.findings if f.code == "examples-truncated")  # at its ### Q line
    assert cut.evidence["first"] == f"{written.doc.path}:7" and cut.evidence["first_tokens"] == real


def _with_sequence_len(doc: Path, n: int) -> str:
    out = doc.parent / "written.dlm"
    out.write_text(doc.read_text().replace("---\n::", f"training:\n  sequence_len: {n}\n---\n::", 1))
    return out.name


@pytest.mark.integration
def test_doctor_counts_with_the_tokenizer_on_disk_and_imports_no_torch(tmp_path: Path) -> None:
    from tests.tinymodel import smollm2_base

    home = converted_home(tmp_path / "home", smollm2_base())
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['dlm', '--home', {str(home)!r}, 'doctor', '--json', {str(REPO / 'configs' / 'tutor.dlm')!r}]\n"
        "try:\n    runpy.run_module('dlm', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out, heavy = res.stdout.rsplit("HEAVY=", 1)
    assert heavy.strip() == "", res.stderr[-2000:]
    data = json.loads(out)["files"][0]
    assert data["corpus"]["exact"] and data["corpus"]["counted_with"] == "smollm2-135m"
    seq = next(d for d in data["plan"]["decisions"] if d["key"] == "sequence_len")
    assert "(counted with smollm2-135m's tokenizer)" in seq["reason"]
    assert (home / "cache" / "tokens" / f"{ID}.json").is_file()
