"""dlm.train on a tiny random Llama with the real SmolLM2 tokenizer: CPU, a few steps per run.

Each test asserts behaviour that breaks when training breaks: every adapter tensor moves, saved
adapters reload to the same outputs, merging keeps the logits, the loss mask covers exactly the
prompt tokens (checked against TRL's own preparation and collator), and an interrupted + resumed run
ends with exactly the tensors of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from dlm.plan.corpus import Example
from dlm.plan.planner import Plan
from tests.tinymodel import tiny_base

pytestmark = pytest.mark.integration
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEM = "You are a concise tutor."
QA = [
    ("What is a decorator?", "A function that wraps another function."),
    ("What does yield do?", "It makes the function a generator."),
    ("List or tuple?", "A list can change; a tuple cannot."),
    ("What is pip?", "The installer for Python packages."),
    ("What is a venv?", "A folder with its own interpreter and packages."),
    ("How to catch errors?", "Use try and except."),
]
PROSE = [
    "# Decorators\n\nA decorator takes a function and returns a new one that wraps it.",
    "Generators produce values lazily, one at a time, and pause between them.",
]


def _examples() -> tuple[list[Example], list[Example]]:
    train = [
        Example(f"q{i}", "instruction", "t.dlm", i, prompt=q, completion=a, system=SYSTEM)
        for i, (q, a) in enumerate(QA)
    ]
    train += [Example(f"p{i}", "prose", "t.dlm", 100 + i, text=t) for i, t in enumerate(PROSE)]
    held = [
        Example(
            "h0",
            "instruction",
            "t.dlm",
            200,
            prompt="What is a module?",
            completion="A file of Python code.",
            system=SYSTEM,
        )
    ]
    return train, held


def make_test_plan(folder: Path, train: list[Example], held: list[Example], **training) -> Plan:
    """`dlm.plan.make_plan` on a spec with these training keys, so the planner's real kwargs reach
    LoraConfig / SFTConfig here. CPU-friendly knobs: fp32, no checkpointing, logging each step."""
    from dlm.doc import schema
    from dlm.plan import bases, corpus, hardware
    from dlm.plan import planner as plan

    knobs = {
        "precision": "fp32",
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "max_steps": 3,
        "micro_batch_size": 2,
        "grad_accum": 1,
        "sequence_len": 128,
        "learning_rate": 2e-3,
        **training,
    }
    spec = schema.Spec(dlm_id="01KAV3J8ZP4N6Q2R7S9T0W1X2Y", base_model=str(folder), training=knobs)
    return plan.make_plan(
        spec, hardware.probe_light(), bases.resolve(str(folder)), corpus.stats(tuple(train), tuple(held))
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("tiny"))


def _adapter_tensors(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Snapshot:
    """A TrainerCallback (duck-typed: the Trainer calls whatever hooks exist) keeping the model and
    its trainable tensors at the start and end of training."""

    def __init__(self):
        self.before = self.after = self.model = None

    def __getattr__(self, name):  # every other hook: do nothing
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before = _adapter_tensors(model)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after, self.model = _adapter_tensors(model), model


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_adapter_trains_saves_reloads_and_merges(
    base: Path, tmp_path: Path, adapter: str, capfd: pytest.CaptureFixture
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dlm.train import run as train
    from dlm.use import export, infer

    tr, held = _examples()
    plan = make_test_plan(base, tr, held, adapter=adapter, max_steps=3)
    snap, steps, events = Snapshot(), [], []
    summary = train.run(
        plan,
        tr,
        held,
        base,
        tmp_path,
        callbacks=[snap],
        on_step=lambda *a: steps.append(a),
        on_event=lambda k, d: events.append(k),
    )
    assert capfd.readouterr().out == ""  # nothing printed: render.py owns the console

    assert summary.status == "ok", summary.message
    assert summary.steps == 3 and [s[0] for s in steps] == [1, 2, 3]
    assert summary.train_loss is not None and summary.train_loss > 0
    assert summary.eval_loss is not None and summary.base_eval_loss is not None
    assert summary.tokens_seen > 0 and summary.peak_memory_bytes > 0 and summary.steady_step_seconds > 0
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3]
    assert all(e["loss"] > 0 and e["tokens_per_s"] > 0 for e in log if "loss" in e)
    assert {"train_begin", "saved", "done"} <= set(events)
    # a CPU plan's thread and allocator settings are applied before the base loads
    assert plan.runtime_kwargs.get("malloc") == "keep-freed"
    assert events.index("cpu_runtime") < events.index("load")

    # Every adapter tensor moved (LoRA B starts at zero, A only moves once B has; DoRA's magnitude too).
    assert snap.before and set(snap.before) == set(snap.after)
    unchanged = [n for n in snap.before if torch.equal(snap.before[n], snap.after[n])]
    assert not unchanged, unchanged
    if adapter == "dora":
        assert any("lora_magnitude_vector" in n for n in snap.before)
    assert summary.trainable_params == sum(t.numel() for t in snap.before.values())

    adapter_dir = Path(summary.adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["use_dora"] is (adapter == "dora")

    ids = torch.tensor([[1, 520, 2103, 314, 253, 1789, 47, 2, 198]])
    trained = snap.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_dir)).eval()
    before_merge = _logits(trained, ids)
    assert torch.equal(_logits(reloaded, ids), before_merge)
    base_only = _logits(AutoModelForCausalLM.from_pretrained(str(base)).eval(), ids)
    assert (before_merge - base_only).abs().max() > 1e-6  # the adapter does change the outputs

    merged = infer.merge_for_inference(reloaded)
    assert not hasattr(merged, "peft_config")
    assert (_logits(merged, ids) - before_merge).abs().max().item() < 1e-4

    # export: a standard HF folder that reloads with the merged logits and a distinct pad token
    out = export.export_merged(adapter_dir, base, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert (_logits(exported, ids) - before_merge).abs().max().item() < 1e-4
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token != tok.eos_token
    text = infer.generate(merged, tok, "What is a decorator?", SYSTEM, max_new_tokens=4)
    assert isinstance(text, str)


@pytest.mark.parametrize("mode", ["branch", "input", "peft"])
def test_dora_dropout_mode_reaches_the_trained_model(base: Path, tmp_path: Path, mode: str) -> None:
    """`dora_dropout: branch` puts every DoRA layer of the trained model on dlm's forward (branch dropout,
    factored norm) once its parity self-check passed; `input` (the default) leaves PEFT's forward alone, and so
    does `dora_forward: peft` (here with `dora_dropout: branch`: PEFT's wins). Either way the saved adapter
    is a plain PEFT DoRA adapter with the same dropout."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear
    from transformers import AutoModelForCausalLM

    from dlm.train import run as train
    from dlm.train.dora_fast import _factored_forward

    tr, held = _examples()
    keys = {"dora_dropout": "branch", "dora_forward": "peft"} if mode == "peft" else {"dora_dropout": mode}
    plan = make_test_plan(base, tr, held, adapter="dora", lora_dropout=0.1, max_steps=4, **keys)
    snap, events = Snapshot(), {}
    summary = train.run(
        plan, tr, held, base, tmp_path, callbacks=[snap], eval_base=False, on_event=lambda k, d: events.setdefault(k, d)
    )
    assert summary.status == "ok", summary.message
    layers = [m for m in snap.model.modules() if isinstance(m, Linear)]
    patched = [m for m in layers if m.lora_variant["default"].__dict__.get("forward") is _factored_forward]
    if mode == "branch":
        event = events["dora_forward"]
        assert (event["forward"], event["factored_norm"], event["layers"]) == ("dlm", True, 14)  # 2 x 7 (all-linear)
        assert [(c["forward"], c["ok"], c["dtype"]) for c in event["checks"]] == [
            ("factored", True, "float32"),
            ("branch", True, "float32"),
        ]
        assert len(patched) == len(layers) == 14
    else:
        assert "dora_forward" not in events and not patched
        assert all("forward" not in m.lora_variant["default"].__dict__ for m in layers)  # PEFT's own
    assert summary.findings == ()
    assert not any(torch.equal(snap.before[n], snap.after[n]) for n in snap.before)  # it trained
    config = json.loads((Path(summary.adapter_dir) / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["lora_dropout"] == 0.1
    assert not [k for k in config if "dlm" in k or "branch" in k]
    ids = torch.tensor([[1, 520, 2103, 314, 253, 1789, 47, 2, 198]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), summary.adapter_dir)
    assert torch.equal(_logits(reloaded.eval(), ids), _logits(snap.model.eval(), ids))  # eval: PEFT's own maths


def test_a_failed_parity_self_check_trains_with_peft_forward(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong dlm forward (planted: the row norm of W alone) fails the self-check before training: the
    run trains with PEFT's forward, says so in its `dora_forward` event and records the warn finding."""
    from peft.tuners.lora.layer import Linear

    from dlm.train import dora_fast
    from dlm.train import run as train
    from tests.test_dora_fast import _norm_of_w_alone

    monkeypatch.setattr(dora_fast, "_factored_forward", _norm_of_w_alone)
    tr, held = _examples()
    plan = make_test_plan(base, tr, held, adapter="dora", lora_dropout=0.0, max_steps=2)
    assert plan.runtime_kwargs["dora_dropout"] == "branch"  # the plan chose dlm's forward
    snap, events = Snapshot(), {}
    summary = train.run(
        plan, tr, held, base, tmp_path, callbacks=[snap], eval_base=False, on_event=lambda k, d: events.setdefault(k, d)
    )
    assert summary.status == "ok", summary.message
    assert events["dora_forward"]["forward"] == "peft" and events["dora_forward"]["layers"] == 0
    assert "failed its parity self-check" in events["dora_forward"]["reason"]
    (finding,) = summary.findings
    assert (finding["level"], finding["code"]) == ("warn", "dora-forward-parity")
    assert summary.to_json()["findings"] == [finding]
    layers = [m for m in snap.model.modules() if isinstance(m, Linear)]
    assert layers and all("forward" not in m.lora_variant["default"].__dict__ for m in layers)


def test_packed_rows_never_attend_to_each_other(base: Path) -> None:
    """`packing: true` is TRL's bfd packing, which is padding-free: rows are concatenated with
    position_ids restarting at 0 and no attention mask. With sdpa, transformers turns the restarts
    into a block-diagonal causal mask, so each row's logits are exactly its logits alone. (Only without a
    KV cache: TRL's compute_loss passes use_cache=False, as here; with a cache the rows would mix.)"""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="sdpa").eval()
    seqs = [[1, 520, 2103, 314, 253], [1, 1789, 47, 2], [1, 198, 520, 2103, 314, 253, 47]]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": q} for q in seqs])
    assert "attention_mask" not in batch and batch["position_ids"][0].tolist() == [
        0,
        1,
        2,
        3,
        4,
        0,
        1,
        2,
        3,
        0,
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # as TRL feeds the model
        packed = model(**inputs, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([q])).logits[0] for q in seqs])
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # no position_ids: one causal row
    assert (packed - alone).abs().max().item() < 1e-4
    assert (mixed - alone).abs().max().item() > 1e-3  # the check can fail: mixing does change the logits


def test_pad_token_differs_from_eos_without_resizing(base: Path) -> None:
    from dlm.train import run as train

    tr, held = _examples()
    model, tok = train.load_base(base, make_test_plan(base, tr, held), trust_remote_code=False)
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == 49152  # an existing token: nothing resized
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id


def test_completion_mask_matches_trl_preparation_and_collator(base: Path, tmp_path: Path) -> None:
    """Run TRL's own dataset preparation and collator on real rows: -100 exactly on prompt tokens."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from dlm.train import rows as rows_mod
    from dlm.train import run as train

    tr, held = _examples()
    plan = make_test_plan(base, tr, held)
    model, tok = train.load_base(base, plan)
    rows = rows_mod.rows([tr[0], tr[-1]], tok)  # one instruction, one prose
    q, a = QA[0]
    assert rows[0]["prompt"].startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n")
    assert rows[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert rows[0]["completion"] == f"{a}<|im_end|>"
    assert rows[1] == {"prompt": "", "completion": PROSE[-1]}

    trainer = SFTTrainer(
        model=model,
        args=train.sft_config(plan, tmp_path, has_eval=False),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=LoraConfig(**plan.lora_kwargs),
    )
    prepared = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    by_len = sorted(prepared, key=lambda r: r["input_ids"][:3])
    qa_row = next(r for r in by_len if r["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>"))
    prose_row = next(r for r in by_len if r is not qa_row)

    prompt_ids = tok(text=rows[0]["prompt"])["input_ids"]
    n = len(prompt_ids)
    assert qa_row["input_ids"][:n] == prompt_ids
    assert qa_row["labels"][:n] == [-100] * n  # every prompt token masked (system, question, template)
    assert -100 not in qa_row["labels"][n:]  # no answer token masked
    assert qa_row["labels"][n:] == qa_row["input_ids"][n:]
    assert tok.decode(qa_row["labels"][n:]) == f"{a}<|im_end|>"  # the answer plus the stop token, once
    assert -100 not in prose_row["labels"]  # prose: loss on every token, eos included
    assert prose_row["input_ids"][-1] == tok.eos_token_id

    batch = trainer.data_collator([qa_row, prose_row])
    width = batch["input_ids"].shape[1]
    short = 0 if len(qa_row["input_ids"]) < width else 1
    pad_from = len([qa_row, prose_row][short]["input_ids"])
    assert (batch["labels"][short, pad_from:] == -100).all()
    assert (batch["input_ids"][short, pad_from:] == tok.pad_token_id).all() and tok.pad_token_id != tok.eos_token_id
    assert (batch["attention_mask"][short, pad_from:] == 0).all()
    assert int((batch["labels"][1 - short] == -100).sum()) == (n if short == 1 else 0)

    # encode_rows (used by eval_loss) reproduces TRL's preparation exactly
    ours = rows_mod.encode_rows(rows, tok, max_length=plan.sft_kwargs.get("max_length"))
    key = lambda r: tuple(r["input_ids"])  # noqa: E731
    assert sorted(({"input_ids": r["input_ids"], "labels": r["labels"]} for r in prepared), key=key) == sorted(
        ours, key=key
    )


def test_qlora_nf4_trains_on_cpu(base: Path, tmp_path: Path) -> None:
    import torch

    from dlm.train import run as train

    tr, held = _examples()
    plan = make_test_plan(base, tr, held, adapter="qlora", max_steps=2)
    assert plan.model_kwargs["quantization"]["bnb_4bit_quant_type"] == "nf4"
    snap = Snapshot()
    summary = train.run(plan, tr, [], base, tmp_path, callbacks=[snap])
    assert summary.status == "ok", summary.message
    assert summary.steps == 2 and summary.train_loss > 0
    assert (Path(summary.adapter_dir) / "adapter_model.safetensors").is_file()
    layer = snap.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    assert not [n for n in snap.before if torch.equal(snap.before[n], snap.after[n])]


def test_galore_with_adapter_runs_without_matched_but_ignored(base: Path, tmp_path: Path) -> None:
    pytest.importorskip("galore_torch")
    import torch

    from dlm.train import run as train

    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    lg = logging.getLogger("transformers")
    lg.addHandler(handler)
    try:
        tr, held = _examples()
        plan = make_test_plan(
            base, tr, held, optimizer="galore_adamw", galore_rank=4, galore_update_proj_gap=2, max_steps=3
        )
        assert plan.sft_kwargs["optim"] == "galore_adamw"
        snap = Snapshot()
        summary = train.run(plan, tr, [], base, tmp_path, callbacks=[snap])
    finally:
        lg.removeHandler(handler)
    assert summary.status == "ok", summary.message
    assert not [r for r in records if "matched but ignored" in r], records[:3]
    assert not [n for n in snap.before if torch.equal(snap.before[n], snap.after[n])]


def test_sigint_then_resume_equals_uninterrupted(base: Path, tmp_path: Path) -> None:
    """Dropout > 0 and two epochs of shuffled batches, so RNG and data order must both be restored."""
    from safetensors.torch import load_file

    from dlm.train import run as train

    tr, held = _examples()  # 8 rows, batch 2: 4 steps an epoch; 6 steps cross an epoch boundary
    plan = make_test_plan(base, tr, held, max_steps=6, lora_dropout=0.1, save_steps=2)

    full = train.run(plan, tr, [], base, tmp_path / "full", eval_base=False)
    assert full.status == "ok"

    previous = signal.getsignal(signal.SIGINT)

    def interrupt(step, *_):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    events: list[tuple[str, dict]] = []
    cut = train.run(
        plan, tr, [], base, tmp_path / "cut", on_step=interrupt, on_event=lambda k, d: events.append((k, d))
    )
    assert cut.status == "interrupted" and cut.adapter_dir is None
    assert cut.steps in (3, 4) and cut.checkpoint.endswith(f"checkpoint-{cut.steps}")
    assert (Path(cut.checkpoint) / "rng_state.pth").is_file() and (Path(cut.checkpoint) / "optimizer.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert not (tmp_path / "cut" / "adapter").exists()
    kinds = [k for k, _ in events]
    assert kinds.count("interrupt") == 1 and "saved" not in kinds
    assert [d["step"] for k, d in events if k == "checkpoint"] == [2, cut.steps]
    assert all(d["seconds"] >= 0 for k, d in events if k == "pause")

    # A copy of the checkpoint without its RNG state, to show the comparison below can fail.
    norng = tmp_path / "norng" / "checkpoints" / Path(cut.checkpoint).name
    shutil.copytree(cut.checkpoint, norng)
    (norng / "rng_state.pth").unlink()

    resumed = train.run(plan, tr, [], base, tmp_path / "cut", resume_from=True, eval_base=False)
    assert resumed.status == "ok" and resumed.steps == 6
    log_steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert log_steps == sorted(set(log_steps)) and log_steps[-1] == 6  # no step logged twice after the resume

    a = load_file(str(Path(full.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:3]
    assert full.train_loss == resumed.train_loss

    # Resuming without the saved RNG state draws other dropout masks: the tensors differ.
    blind = train.run(plan, tr, [], base, tmp_path / "norng", resume_from=norng, eval_base=False)
    c = load_file(str(Path(blind.adapter_dir) / "adapter_model.safetensors"))
    assert blind.steps == 6 and not all(a[k].equal(c[k]) for k in a)


def test_non_finite_loss_fails_and_saves_no_adapter(base: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from dlm.train import run as train

    tr, held = _examples()
    plan = make_test_plan(base, tr, held, max_steps=4)
    # A learning rate no schema accepts, to blow the weights up on purpose.
    plan = replace(plan, sft_kwargs={**plan.sft_kwargs, "learning_rate": 1e30, "max_grad_norm": 0.0})
    summary = train.run(plan, tr, held, base, tmp_path)
    assert summary.status == "failed" and "nan" in summary.message.lower()
    assert summary.steps < 4 and summary.adapter_dir is None and not (tmp_path / "adapter").exists()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    last = [e for e in log if "loss" in e][-1]
    assert last["step"] == summary.steps and last["loss"] is None  # logged, as strict JSON (null, not NaN)
