"""Multi-turn `messages` rows train as one conversation (`dlm.plan.chat`, `dlm.train.rows`).

Unit tier: the row becomes one example with its earlier exchanges as history; the layout's text
and trained spans with a small word-level tokenizer, a template that refuses a system role, no
template at all, and a template that renders earlier turns differently; the plan's exact count; bad
multi-turn rows keep their `path:line:col` errors. Integration tier (the tiny Llama with the real
SmolLM2 tokenizer): the training row is the chat template's own token ids, labelled exactly where a
`{% generation %}`-marked copy of the template says the assistant speaks; TRL keeps those labels;
single-turn rows are untouched; the plan counts what training encodes; held-out loss and the
learning report see the conversation as training does; a run trains on it end to end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FIXTURES

from dlm.doc.datafiles import read_doc
from dlm.errors import DlmError
from dlm.plan import chat, corpus, tokens
from dlm.plan.corpus import Example

ID = "01KAV3J8ZP4N6Q2R7S9T0W1X2Y"
SYSTEM = "You are a terse tutor."
TURNS = [
    ("What is a list?", "An ordered, changeable collection."),
    ("And a tuple?", "The same, but it cannot change."),
    ("Which one for fixed pairs?", "The tuple."),
]


def messages(turns=TURNS, system: str | None = SYSTEM) -> list[dict[str, str]]:
    return chat.messages(turns, system)


def conversation_doc(folder: Path, rows: list[dict], *, training: str = "", base: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = folder / "c.dlm"
    doc.write_text(f"---\ndlm_id: {ID}\n{base}data: [chat.jsonl]\n{training}---\nSome prose about Python.\n")
    return doc


def conv(turns=TURNS, system: str | None = SYSTEM, *, n: int = 0) -> Example:
    """The example `corpus.examples` makes of a multi-turn row (checked in the first test)."""
    parts = [t for pair in turns for t in pair]
    return Example(
        corpus._id("instruction", system or "", *parts),
        "instruction",
        "chat.jsonl",
        n + 1,
        prompt=turns[-1][0],
        completion=turns[-1][1],
        system=system,
        history=tuple(turns[:-1]),
    )


# --- unit: the document side ---------------------------------------------------------------------


def test_a_multi_turn_row_is_one_example_and_a_one_turn_row_an_ordinary_pair(tmp_path: Path) -> None:
    one = [("What is pip?", "The package installer.")]
    doc = conversation_doc(tmp_path, [{"messages": messages()}, {"messages": messages(one, None)}])
    sections = read_doc(doc).sections
    assert [(s.conversation, len(s.pairs)) for s in sections[1:]] == [(True, 3), (False, 1)]
    exs = corpus.examples(read_doc(doc))
    multi, single = (e for e in exs if e.kind == "instruction")
    # the conversation: one example, its last exchange as prompt/completion, the rest as history
    assert (multi.prompt, multi.completion, multi.history, multi.system) == (*TURNS[-1], tuple(TURNS[:-1]), SYSTEM)
    assert multi == replace(conv(n=0), source=str(tmp_path / "chat.jsonl")) and multi.where.endswith("chat.jsonl:1")
    assert multi.id != corpus._id("instruction", SYSTEM, *TURNS[-1])  # not the last pair's id
    # the one-exchange row: exactly the example it always was
    assert single == Example(
        corpus._id("instruction", "", *one[0]), "instruction", str(tmp_path / "chat.jsonl"), 2, "", *one[0]
    )
    assert single.history == () and single.est_tokens == int(corpus.estimate_tokens("".join(one[0]))) + 24
    assert multi.est_tokens > Example("x", "instruction", "t", 1, "", *TURNS[-1], system=SYSTEM).est_tokens + 40


def test_a_conversation_counts_as_one_instruction_example_in_the_split(tmp_path: Path) -> None:
    rows = [{"messages": messages(TURNS[: k + 2], None)} for k in range(2)] + [{"prompt": "p", "completion": "c"}]
    exs = corpus.examples(read_doc(conversation_doc(tmp_path, rows)))
    assert [(e.kind, len(e.history)) for e in exs] == [
        ("prose", 0),
        ("instruction", 1),
        ("instruction", 2),
        ("instruction", 0),
    ]
    stats = corpus.stats(exs, ())
    assert (stats.n_train, stats.n_instruction) == (4, 3)


@pytest.mark.parametrize(
    ("turns", "col", "words"),
    [
        ([("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("user", "u3")], 2, "messages[3] is a user message"),
        ([("user", "u1"), ("assistant", "a1"), ("user", "u2")], 2, "does not end with an assistant reply"),
        ([("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", " ")], 2, "messages[3].content is empty"),
        ([("system", "s"), ("user", "u1"), ("assistant", "a1"), ("system", "s2")], 2, "messages[3] is a system"),
    ],
)
def test_bad_multi_turn_rows_name_the_file_row_and_column(tmp_path: Path, turns: list, col: int, words: str) -> None:
    good = json.dumps({"messages": messages(TURNS[:2], None)})
    bad = json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})
    (tmp_path / "chat.jsonl").write_text(f"{good}\n{bad}\n")
    doc = tmp_path / "c.dlm"
    doc.write_text(f"---\ndlm_id: {ID}\ndata: [chat.jsonl]\n---\nProse.\n")
    with pytest.raises(DlmError) as info:
        read_doc(doc)
    e = info.value
    assert (e.path, e.line, e.col) == (str(tmp_path / "chat.jsonl"), 2, col), e.render()
    assert words in e.message and e.hint


def test_the_corpus_hash_sees_a_conversation_s_earlier_turns(tmp_path: Path) -> None:
    from dlm.plan.hardware import load_fixture
    from dlm.plan.prepare import prepare
    from dlm.store.current import corpus_sha256

    def sha(folder: str, rows: list[dict]) -> tuple[str, str]:
        prepared = prepare(conversation_doc(tmp_path / folder, rows), load_fixture(FIXTURES / "hardware" / "cpu.json"))
        return corpus_sha256(prepared), _sha_before(prepared)

    changed = [TURNS[0], (TURNS[1][0], "Not the same answer."), TURNS[2]]
    assert sha("a", [{"messages": messages()}])[0] != sha("b", [{"messages": messages(changed)}])[0]
    # without conversations the hash is the one stored versions were recorded with
    new, before = sha("c", [{"messages": messages(TURNS[:1])}, {"prompt": "p", "completion": "c"}])
    assert new == before


def _sha_before(prepared) -> str:
    """`corpus_sha256` as it was before conversations."""
    h = hashlib.sha256()
    for part, exs in (("train", prepared.train), ("heldout", prepared.heldout)):
        for ex in sorted(exs, key=lambda e: e.id):
            fields = [part, ex.kind, ex.text, ex.prompt, ex.completion, ex.rejected, ex.system]
            h.update(json.dumps(fields, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


# --- unit: the layout with a small tokenizer of our own --------------------------------------------

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' and no_system %}{{ raise_exception('no system') }}"
    "{% endif %}<s>{{ m['role'] }} {{ m['content'] }} </s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant {% endif %}"
)
WORD_TURNS = [("hello", "fine"), ("how are you", "a b")]


def small_tokenizer(folder: Path, template: str | None = TEMPLATE, **config) -> tokens.ChatTokenizer:
    """A word-level tokenizer: whitespace words, specials <s> </s> <unk>, BOS added by the config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<unk> <s> </s> user assistant system hello world how are you fine x a b".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, **config}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = tokens.load(folder, "small")
    assert loaded is not None
    return loaded


def test_the_layout_trains_every_answer_with_the_earlier_turns_before_it(tmp_path: Path) -> None:
    tok = small_tokenizer(tmp_path / "tok")
    lay = tokens.conversation(tok, conv(WORD_TURNS, "x"))
    # the template's leading <s> is dropped (the tokenizer adds BOS itself); its trailing newline too
    assert lay.text == (
        "system x </s>\n<s>user hello </s>\n<s>assistant fine </s>\n<s>user how are you </s>\n<s>assistant a b </s>"
    )
    assert [lay.text[a:b] for a, b in lay.spans] == ["fine </s>", "a b </s>"]
    # the second answer's context is the whole first exchange, its head what `dlm chat` would send
    assert lay.last_head.endswith("<s>user hello </s>\n<s>assistant fine </s>\n<s>user how are you </s>\n<s>assistant ")
    # BOS + 3 (system x </s>) + 4 + 4 + 6 + 5 words and specials: the plan's count is the encoded whole
    assert tokens.lengths(tok, [conv(WORD_TURNS, "x")]) == {conv(WORD_TURNS, "x").id: 23}


def test_a_one_exchange_layout_is_the_single_turn_row(tmp_path: Path) -> None:
    tok = small_tokenizer(tmp_path / "tok")
    single = Example("s", "instruction", "t", 1, "", *WORD_TURNS[0], system="x")
    lay = tokens.conversation(tok, single)
    row = tokens.row(tok, single)
    assert lay.text == row["prompt"] + row["completion"] and lay.spans == ((len(row["prompt"]), len(lay.text)),)


def test_a_template_that_refuses_a_system_role_gets_it_folded_into_the_first_question(tmp_path: Path) -> None:
    tok = small_tokenizer(tmp_path / "tok", no_system=True)
    tok = tokens.ChatTokenizer(tok.name, tok.backend, tok.template, {**tok.special, "no_system": "1"}, tok.bos_prefix)
    lay = tokens.conversation(tok, conv(WORD_TURNS, "x"))
    assert lay.text.startswith("user x\n\nhello </s>\n<s>assistant fine </s>\n<s>user how are you")
    assert [lay.text[a:b] for a, b in lay.spans] == ["fine </s>", "a b </s>"]


def test_without_a_chat_template_turns_follow_dlm_s_layout_as_dlm_chat_does(tmp_path: Path) -> None:
    tok = small_tokenizer(tmp_path / "tok", template=None)
    lay = tokens.conversation(tok, conv(WORD_TURNS, "x"))
    assert lay.text == "### Question\nhello\n\n### Answer\nfine\n\n### Question\nhow are you\n\n### Answer\na b</s>"
    assert [lay.text[a:b] for a, b in lay.spans] == ["fine", "a b</s>"]


def test_a_template_that_rewrites_earlier_turns_is_refused_not_guessed() -> None:
    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        # like a template that drops earlier answers' reasoning: only the last answer is written whole
        answers, seen, out = sum(m["role"] == "assistant" for m in msgs), 0, ""
        for m in msgs:
            seen += m["role"] == "assistant"
            content = "..." if m["role"] == "assistant" and seen < answers else m["content"]
            out += f"[{m['role']}] {content}\n"
        return out + ("[assistant] " if generation_prompt else "")

    with pytest.raises(chat.TemplateMismatch, match="up to turn 1"):
        chat.layout(WORD_TURNS, None, render, eos="</s>", bos_prefix="", fallback="{prompt}")
    # one exchange is always a prefix of itself: the same renderer lays it out
    assert chat.layout(WORD_TURNS[:1], None, render, eos="</s>", bos_prefix="", fallback="{prompt}").spans


def test_the_count_cache_keys_a_conversation_by_its_history() -> None:
    a, b = conv(), conv([TURNS[0], (TURNS[1][0], "Changed."), TURNS[2]])
    assert tokens._key(a) != tokens._key(b)
    single = Example("s", "instruction", "t", 1, "", "q", "a")
    assert tokens._key(single) == tokens._key(Example("other", "instruction", "u", 9, "", "q", "a"))


# --- integration: the real SmolLM2 tokenizer and the tiny Llama ----------------------------------

# SmolLM2's own template with `{% generation %}` around each assistant answer and its end-of-turn
# token: transformers' `return_assistant_tokens_mask` then says which tokens the assistant wrote.
MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tinymodel import tiny_base

    return tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def hf(base: Path):
    from transformers import AutoTokenizer

    from dlm.train.rows import ensure_pad_token

    tok = AutoTokenizer.from_pretrained(str(base))
    ensure_pad_token(tok)  # as training does before it renders rows
    return tok


def _oracle(hf, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels) from the template itself: all of it tokenized, labels where the assistant speaks,
    the whitespace the template writes after the last end-of-turn token left out (as single-turn rows
    leave it out)."""
    assert hf.apply_chat_template(msgs, tokenize=False) == hf.apply_chat_template(
        msgs, chat_template=MARKED, tokenize=False
    )
    out = hf.apply_chat_template(msgs, chat_template=MARKED, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    assert ids == list(hf.apply_chat_template(msgs, return_dict=True)["input_ids"])
    while not hf.decode(ids[-1:]).strip():
        ids, mask = ids[:-1], mask[:-1]
    return ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)]


def _spans(labels: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i, label in enumerate(labels):
        if label != -100:
            if i and labels[i - 1] != -100:
                out[-1].append(label)
            else:
                out.append([label])
    return out


@pytest.mark.integration
@pytest.mark.parametrize("system", [SYSTEM, None], ids=["own-system", "template-default"])
def test_the_training_row_is_the_chat_template_token_for_token(hf, system: str | None) -> None:
    from dlm.train.rows import rows

    msgs = messages(TURNS, system)
    (row,) = rows([conv(TURNS, system)], hf)
    ids, labels = _oracle(hf, msgs)
    assert row["input_ids"] == ids  # the whole conversation, exactly as the template renders it
    assert row["labels"] == labels  # -100 on system, user and template tokens; every answer trained
    assert [hf.decode(s) for s in _spans(row["labels"])] == [f"{a}<|im_end|>" for _, a in TURNS]
    masked = hf.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab == -100])
    assert all(q in masked for q, _ in TURNS) and (system or "SmolLM") in masked


@pytest.mark.integration
def test_the_second_answer_is_trained_with_the_first_exchange_before_it(hf) -> None:
    from dlm.train.rows import rows

    (row,) = rows([conv(TURNS[:2])], hf)
    second = [i for i, lab in enumerate(row["labels"]) if lab != -100][-1]  # its end-of-turn token
    start = max(i for i in range(second) if row["labels"][i] == -100) + 1
    before = hf.decode(row["input_ids"][:start])
    assert hf.decode(row["input_ids"][start : second + 1]) == f"{TURNS[1][1]}<|im_end|>"
    positions = [before.index(t) for t in (SYSTEM, TURNS[0][0], TURNS[0][1], TURNS[1][0])]
    assert positions == sorted(positions) and before.endswith("<|im_start|>assistant\n")


@pytest.mark.integration
def test_trl_keeps_the_labels_and_single_turn_rows_are_what_trl_made_before(base: Path, hf, tmp_path: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from dlm.doc import schema
    from dlm.plan import bases, hardware, planner
    from dlm.train.rows import encode_rows, rows
    from dlm.train.run import sft_config

    single = Example("s", "instruction", "t.dlm", 3, "", "What is pip?", "The package installer.", system=SYSTEM)
    prose = Example("p", "prose", "t.dlm", 9, text="Generators produce values lazily.")
    plain = rows([single, prose], hf)
    assert all(set(r) == {"prompt", "completion"} for r in plain)  # no conversation: the rows of before

    knobs = {"precision": "fp32", "gradient_checkpointing": False, "micro_batch_size": 2, "sequence_len": 256}
    spec = schema.Spec(dlm_id=ID, base_model=str(base), training=knobs)
    stats = corpus.stats((conv(), single, prose), ())
    plan = planner.make_plan(spec, hardware.probe_light(), bases.resolve(str(base)), stats)
    max_length = plan.sft_kwargs["max_length"]

    def prepared(rows_: list[dict]) -> list[dict]:
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(base)),
            args=sft_config(plan, tmp_path / "out", has_eval=False),
            train_dataset=Dataset.from_list(rows_),
            processing_class=hf,
            peft_config=LoraConfig(**plan.lora_kwargs),
        )
        ds = trainer.train_dataset
        return [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(len(ds))]

    key = lambda r: tuple(r["input_ids"])  # noqa: E731
    mixed = rows([conv(), single, prose], hf)
    assert all(set(r) == {"input_ids", "labels"} for r in mixed)
    trl_mixed = sorted(prepared(mixed), key=key)
    assert trl_mixed == sorted(encode_rows(mixed, hf, max_length), key=key)  # TRL kept our ids and labels
    # the single-turn and prose rows in a set with a conversation: what TRL itself makes of them
    trl_plain = sorted(prepared(plain), key=key)
    assert trl_plain == sorted(encode_rows(plain, hf, max_length), key=key)
    conv_ids = mixed[0]["input_ids"]
    assert [r for r in trl_mixed if r["input_ids"] != conv_ids] == trl_plain


@pytest.mark.integration
def test_the_plan_counts_the_conversation_as_training_encodes_it(base: Path, hf, tmp_path: Path) -> None:
    from dlm.plan.hardware import probe_light
    from dlm.plan.prepare import prepare
    from dlm.train.rows import conversation, encode_rows, rows

    light = tokens.load(base, "tiny")
    assert light is not None
    exs = [conv(), conv(TURNS, None, n=1), conv(TURNS[:2], "x", n=2)]
    real = [len(r["input_ids"]) for r in encode_rows(rows(exs, hf), hf)]
    assert list(tokens.lengths(light, exs).values()) == real
    assert [tokens.conversation(light, e) for e in exs] == [conversation(hf, e) for e in exs]  # one layout

    doc = conversation_doc(tmp_path, [{"messages": messages()}], base=f"base_model: {base}\n")
    planned = prepare(doc, probe_light(), base_folder=lambda _: base)
    (ex,) = (e for e in planned.train + planned.heldout if e.history)
    n = len(encode_rows(rows([ex], hf), hf)[0]["input_ids"])
    assert planned.corpus.exact and planned.corpus.max_tokens == n == real[0]


@pytest.mark.integration
def test_held_out_loss_and_the_learning_report_see_the_conversation_as_training_does(base: Path, hf) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dlm.train.evaluate import eval_loss
    from dlm.train.rows import question_head
    from dlm.use.infer import conversation_head

    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    ex = conv()
    ids, labels = _oracle(hf, messages())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits.float()[0]
    target = torch.tensor(labels[1:])
    manual = torch.nn.functional.cross_entropy(logits[:-1], target, ignore_index=-100, reduction="mean")
    assert eval_loss(model, hf, [ex]) == pytest.approx(float(manual), rel=1e-5)  # every answer, nothing else

    msgs = messages()
    head = hf.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    assert question_head(hf, ex) == head == conversation_head(hf, msgs[1:-1], SYSTEM)  # as `dlm chat` asks it


@pytest.mark.integration
def test_a_template_that_rewrites_earlier_turns_is_a_clear_error_at_the_row(hf) -> None:
    from dlm.train.rows import rows

    dropping = MARKED.replace(
        "message['content'] + '<|im_end|>'", "(message['content'] if loop.last else '') + '<|im_end|>'"
    )
    original = hf.chat_template
    hf.chat_template = dropping
    try:
        with pytest.raises(DlmError) as info:
            rows([conv(n=6)], hf)
    finally:
        hf.chat_template = original
    e = info.value
    assert (e.path, e.line, e.col) == ("chat.jsonl", 7, 1) and "up to turn 1" in e.message
    assert e.hint == chat.CONTEXT_HINT


@pytest.mark.integration
def test_a_document_with_conversations_trains_evaluates_and_reports(base: Path, tmp_path: Path) -> None:
    from dlm.plan.hardware import probe_light
    from dlm.plan.prepare import prepare
    from dlm.train import run as train

    held = [("What is a set?", "An unordered collection of unique items."), ("Can it hold a list?", "No.")]
    training = (
        "training:\n  precision: fp32\n  gradient_checkpointing: false\n  max_steps: 2\n  micro_batch_size: 2\n"
        "  grad_accum: 1\n  sequence_len: 256\n  logging_steps: 1\n"
    )
    rows = [
        {"messages": messages()},
        {"messages": messages(TURNS[:2], None)},
        {"prompt": "What is pip?", "completion": "The package installer."},
        {"messages": messages(held), "heldout": True},
    ]
    doc = conversation_doc(tmp_path / "doc", rows, training=training, base=f"base_model: {base}\n")
    planned = prepare(doc, probe_light(), base_folder=lambda _: base)
    assert [len(e.history) for e in planned.heldout] == [1]
    events: list[tuple[str, dict]] = []
    summary = train.run(
        planned.plan,
        planned.train,
        planned.heldout,
        base,
        tmp_path / "out",
        report=4,
        on_event=lambda k, d: events.append((k, d)),
    )
    assert summary.status == "ok", summary.message
    assert dict(events)["rows"] == {"train": 4, "heldout": 1}  # prose, two conversations, one pair
    assert summary.eval_loss is not None and summary.base_eval_loss is not None
    report = summary.learning
    assert report is not None
    asked = {a["question"]: a["expected"] for a in report["answers"]}
    # a conversation is asked its last question (after its earlier turns) and scored on its last answer
    assert asked[TURNS[-1][0]] == TURNS[-1][1] and asked[TURNS[1][0]] == TURNS[1][1] and asked[held[1][0]] == "No."
