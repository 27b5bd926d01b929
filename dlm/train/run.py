"""Training: the recipe `run` and the short translators from the plan's kwargs to the libraries.

Length (~660 lines, over the house's ~400): `run` and its numbered steps read top to bottom in one
file, as a torchtune recipe does; rows, the loop's plumbing, evaluation and the learning report are
already their own modules, and no function here is over ~60 lines.

Every heavy import sits inside a function, so `import dlm.train` is instant. `run` reads top to
bottom like a recipe: load the base, turn examples into rows, build `LoraConfig` / `SFTConfig` from
the plan's kwargs (unchanged, TRL 1.16 / PEFT names), train with `SFTTrainer`, save, summarise.

Rows and chat rendering live in `dlm/train/rows.py`; evaluation loss in `dlm/train/evaluate.py`.

Progress (this module prints nothing; `render.py` draws):
- `on_step(step, max_steps, loss, tokens, elapsed_s)` after every optimizer step; `loss` is the
  latest logged training loss (None before the first log), `tokens` the tokens seen so far
  (prompt tokens included; from TRL's `num_tokens`), `elapsed_s` wall time since training began.
- `on_event(kind, data)`: "cpu_runtime" ({threads, malloc}: the plan's CPU settings as applied,
  dlm/cpu_runtime.py), "load" / "loaded" (base), "rows" (counts), "dora_forward" ({forward: dlm | peft,
  layers, factored_norm, checks, reason}: DoRA's training forward once its guards ran, dlm/train/dora_fast.py), "train_begin" ({step, max_steps}), "step_time" ({step, seconds, steady}: one step's compute time and the running
  steady-state median), "pause" ({kind: eval|checkpoint, seconds}: time that was not training, for
  `progress.EtaEstimator.exclude`), "log" (each log entry as written to log.jsonl), "interrupt"
  ({signal}), "checkpoint" ({path, step}), "eval" ({eval_loss, base_eval_loss}), "saved"
  ({adapter}), "report" ({line, learning}: the learning report), "done" ({status, steps}).
- `callbacks`: extra `transformers.TrainerCallback` instances, passed to the trainer as they are.
The callback, the signal handlers and the quieting of the libraries' bars live in `dlm/train/loop.py`.

Signals: while `run` trains, SIGINT / SIGTERM ask it to stop at the next step boundary; it saves a
checkpoint there and returns status "interrupted" (a second SIGINT aborts at once; one that comes
within a second is the same Ctrl-C forwarded by a launcher). Under torchrun every rank stops at the
same step. The previous handlers are restored when `run` returns. `resume_from` (a checkpoint
folder, or True for the newest in `out_dir`: `checkpoints-dpo/` before `checkpoints/`) restores weights, optimizer, scheduler,
every rank's RNG state (Python, NumPy, torch CPU and device) and step through the Trainer's
`resume_from_checkpoint`; under several processes rank 0's checkpoint holds every rank's
`rng_state_<rank>.pth` (`loop.keep_every_rank_rng`). A two-phase run resumed from a DPO checkpoint
does not train SFT again: the SFT phase's final checkpoint gives the adapter the DPO trainer is
built on (`_sft_done`). On a CPU the resumed run ends with the same
adapter tensors as an uninterrupted one, in one process and in two (tested).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from dlm.errors import DlmError
from dlm.plan.corpus import Example
from dlm.plan.planner import Plan
from dlm.store.checkpoints import CHECKPOINTS, DPO_CHECKPOINTS, is_dpo_checkpoint, resume_point, sft_final
from dlm.train.logs import Tracker, logs_dir
from dlm.train.loop import (
    LoopState,
    OnEvent,
    OnStep,
    keep_every_rank_rng,
    progress_callback,
    quiet_progress,
    stop_on_signals,
    trainer_args,
    trim_log,
)
from dlm.train.progress import steady_step_seconds
from dlm.train.rows import ADDED_PAD, ensure_pad_token, rows, torch_dtype

# bitsandbytes logs a warning on import (peft imports it) about an optional CPU kernel package that
# the 4-bit path does not need; set before any heavy import so it never reaches the user's console.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

Status = Literal["ok", "failed", "interrupted"]


@dataclass(frozen=True)
class RunSummary:
    status: Status
    steps: int  # optimizer steps done (global step, resumed steps included)
    max_steps: int
    train_loss: float | None  # the last logged training loss
    eval_loss: float | None  # token-weighted mean loss on the held-out rows (`eval_loss()`)
    base_eval_loss: float | None  # the same for the base with the adapter disabled
    seconds: float  # wall time of this call
    steady_step_seconds: float | None  # median step time without warm-up and eval/save pauses
    tokens_seen: int
    peak_memory_bytes: int  # CUDA: max allocated; CPU: peak RSS of the process
    trainable_params: int
    total_params: int
    adapter_dir: str | None  # out_dir/adapter when status is "ok"
    checkpoint: str | None  # the newest checkpoint folder (resume from it)
    message: str = ""
    log_history: tuple[dict, ...] = field(default_factory=tuple)
    learning: dict[str, Any] | None = None  # the learning report (dlm/train/learning.py), when asked for
    # objective dpo: {"heldout": {...}, "train": {...}} from `preference.measure`; and each phase's
    # {"phase", "steps", "train_loss", "log"} (log: that phase's logged entries), in order.
    preference: dict[str, Any] | None = None
    phases: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # Run-time findings, shaped like the plan's: where the run did not do what the plan said (a DoRA
    # forward that fell back to PEFT's: dora-forward-parity, dora-forward-peft-version).
    findings: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["log_history"] = list(self.log_history)
        data["findings"] = list(self.findings)
        data["phases"] = [{k: v for k, v in p.items() if k != "log"} for p in self.phases]
        return data


# --- translating the plan's kwargs ---------------------------------------------------------------


def from_pretrained_kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The plan's `model_kwargs` -> `from_pretrained` arguments: the one short translator.

    dtype strings become torch dtypes; `quantization` (BitsAndBytesConfig kwargs or None) becomes
    `quantization_config`; everything else passes through under its own name.
    """
    from transformers import BitsAndBytesConfig

    kwargs = dict(model_kwargs)
    if "dtype" in kwargs:
        kwargs["dtype"] = torch_dtype(kwargs["dtype"])
    quant = kwargs.pop("quantization", None)
    if quant:
        quant = {k: torch_dtype(v) if k.endswith("_dtype") or k.endswith("_storage") else v for k, v in quant.items()}
        kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
    return kwargs


def _checkpointing(plan: Plan) -> bool:
    kw = plan.sft_kwargs
    value = kw.get("activation_checkpointing", kw.get("gradient_checkpointing"))
    return True if value is None else bool(value)  # TRL's default is on


# --- base, tokenizer and rows --------------------------------------------------------------------


def load_base(folder: Path, plan: Plan, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) for training: dtype / attention / 4-bit from `plan.model_kwargs`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = from_pretrained_kwargs(plan.model_kwargs)
    if "quantization_config" in kwargs and "device_map" not in kwargs:
        import torch

        if torch.cuda.is_available():  # bitsandbytes quantises on the device the weights land on
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    ensure_pad_token(tokenizer, model)
    if "quantization_config" in kwargs:
        from peft import prepare_model_for_kbit_training

        # Casts norms to fp32 and freezes the 4-bit weights; checkpointing as the plan decided.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=_checkpointing(plan))
    return model, tokenizer


# --- the run -------------------------------------------------------------------------------------


def sft_config(plan: Plan, output_dir: Path, *, max_steps: int | None = None, has_eval: bool = True) -> Any:
    """`SFTConfig(output_dir=..., **plan.sft_kwargs)`: the plan's names pass through unchanged.

    Only run-mechanics are added when the plan does not say: no tqdm (render.py draws), NaN losses
    logged as NaN (so the run can stop on them), a few checkpoints kept. A CLI `--max-steps`
    overrides the plan's length; with no held-out rows, periodic evaluation is switched off.
    """
    from trl import SFTConfig

    return trainer_args(SFTConfig, plan.sft_kwargs, output_dir, max_steps, has_eval)


def peak_memory() -> int:
    """This process's peak: `max_memory_allocated` on CUDA, peak RSS elsewhere (bytes)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _reset_peak_memory() -> None:
    """Start `peak_memory`'s CUDA count from this run."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _finite_adapter(model: Any) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def run(
    plan: Plan,
    train_examples: Sequence[Example],
    heldout_examples: Sequence[Example],
    base_folder: Path,
    out_dir: Path,
    *,
    trust_remote_code: bool = False,
    callbacks: Sequence[Any] = (),
    resume_from: Path | bool | None = None,
    max_steps: int | None = None,
    on_step: OnStep | None = None,
    on_event: OnEvent | None = None,
    eval_base: bool = True,
    report: int = 0,
    seed: int = 42,
) -> RunSummary:
    """Train one adapter: `out_dir/adapter/` (PEFT safetensors), `out_dir/log.jsonl`,
    `out_dir/checkpoints/checkpoint-N/`, and with `report_to: tensorboard` the event files in
    `out_dir/logs/` (dlm/train/logs.py). Returns the summary; raises only on bugs and bad input.

    `max_steps` overrides the plan's length (CLI `--max-steps`); `eval_base` also scores the base
    with the adapter disabled on the held-out rows (`base_eval_loss`). `report` > 0 answers that many
    training questions (drawn with `seed`) and every held-out one, adapter and base, into the learning
    report (`RunSummary.learning`).
    """
    t0 = time.monotonic()
    _import_stack()
    emit: OnEvent = on_event or (lambda kind, data: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "log.jsonl"
    if resume_from is True:
        resume_from = resume_point(out_dir)
        if resume_from is None:
            raise DlmError(f"no checkpoint to resume from in {out_dir / CHECKPOINTS}", "train without --resume")
    two = plan.phases == ("sft", "dpo")
    in_dpo = bool(resume_from) and two and is_dpo_checkpoint(Path(str(resume_from)))
    resume_from = _open_log(log_path, resume_from, ("dpo" if in_dpo else "sft") if two else None)
    _reset_peak_memory()
    loop = LoopState(checkpoint=str(resume_from) if resume_from else None)
    tracker = Tracker(plan, logs_dir(out_dir))  # report_to's log, written from the same events
    emit = tracker.listen(emit)

    with tracker, stop_on_signals(loop, emit), quiet_progress():
        model, tokenizer = _load(plan, base_folder, trust_remote_code, emit)  # 1. load
        dpo = "dpo" in plan.phases
        sft_train = [e for e in train_examples if not (dpo and e.kind == "preference")]
        sft_held = [e for e in heldout_examples if not (dpo and e.kind == "preference")]
        progress = progress_callback(loop, log_path, on_step, emit)
        phases: list[dict[str, Any]] = []
        trainer, max_length = None, None
        if "sft" in plan.phases:
            loop.phase = "sft" if dpo else None
            train_rows, held_rows = _make_rows(sft_train, sft_held, tokenizer, emit)  # 2. rows
            args = sft_config(plan, out_dir / "checkpoints", max_steps=max_steps, has_eval=bool(held_rows))  # 3. wrap
            trainer = _trainer(plan, args, model, tokenizer, train_rows, held_rows, [progress, *callbacks], emit)
            keep_every_rank_rng(trainer)  # several processes: every rank's RNG state in the resumable checkpoint
            model = trainer.model  # the PEFT model, as TRL wrapped it
            loop.findings.extend(_dora_forward(plan, model, emit))  # 3b. DoRA's forward, guarded
            max_length = args.max_length
            if dpo:
                emit("phase", {"phase": "sft", "index": 1, "of": len(plan.phases)})
            if in_dpo:  # 4a. resuming in the DPO phase: the SFT phase's final adapter, not trained again
                assert resume_from is not None
                phases.append(_sft_done(model, resume_from.parent.parent, out_dir, loop, emit))
            else:
                _train(trainer, loop, resume_from)  # 4. train
                phases.append(_phase("sft", trainer.state, loop))
        if dpo and not (loop.interrupted or loop.failed):  # 4b. the DPO phase
            dpo_from = resume_from if (in_dpo or plan.phases == ("dpo",)) else None
            trainer, args = _dpo_phase(
                plan, model, tokenizer, train_examples, heldout_examples, out_dir, loop, dpo_from, max_steps,
                [progress, *callbacks], emit,
            )  # fmt: skip
            model, max_length = trainer.model, args.max_length
            phases.append(_phase("dpo", trainer.state, loop))
        assert trainer is not None  # the plan has at least one phase
        params = _param_counts(model)
        ending = _judge_and_save(  # 5. judge and save
            model,
            tokenizer,
            loop,
            heldout=heldout_examples if (sft_held or dpo) else (),
            max_length=max_length,
            eval_base=eval_base,
            target=out_dir / "adapter",
            emit=emit,
        )
        if ending.status == "ok" and dpo:  # 5a. preference accuracy and reward margin, adapter and base
            ending = _preference(model, tokenizer, ending, plan, train_examples, heldout_examples, seed, emit)
        if ending.status == "ok" and report > 0:  # 5b. what did it learn?
            ending = _learning(model, tokenizer, ending, train_examples, heldout_examples, report, seed, emit)
    ending = replace(ending, phases=tuple(phases))
    summary = _summarise(trainer.state, loop, ending, params, seconds=time.monotonic() - t0)  # 6. summarise
    emit("done", {"status": summary.status, "steps": summary.steps})
    return summary


# --- the run's steps, in order -------------------------------------------------------------------


def _import_stack() -> None:
    """The training stack, imported before the signal handlers go in: a Ctrl-C during these seconds
    aborts at once (no run has started to save), and their time counts in the run's wall time."""
    import torch  # noqa: F401
    from datasets import Dataset  # noqa: F401
    from peft import LoraConfig  # noqa: F401
    from transformers import PrinterCallback, ProgressCallback, set_seed  # noqa: F401
    from trl import SFTTrainer  # noqa: F401

    from dlm.train.evaluate import eval_loss  # noqa: F401


def _open_log(log_path: Path, resume_from: Path | bool | None, phase: str | None) -> Path | None:
    """Resuming: drop the log lines of the steps that will be redone (of `phase`, the one the checkpoint
    is in, in a two-phase run), and return the checkpoint folder. Otherwise: start an empty log, and
    return None."""
    if not resume_from:
        log_path.write_text("")
        return None
    assert not isinstance(resume_from, bool)  # `--resume` was resolved to a folder by now
    checkpoint = Path(resume_from)
    trim_log(log_path, json.loads((checkpoint / "trainer_state.json").read_text())["global_step"], phase)
    return checkpoint


def _load(plan: Plan, base_folder: Path, trust_remote_code: bool, emit: OnEvent) -> tuple[Any, Any]:
    """1. load: the plan's CPU runtime settings, then the base and its tokenizer. Seeded first: PEFT
    draws the adapter's initial weights from the global RNG."""
    from transformers import set_seed

    set_seed(int(plan.sft_kwargs.get("seed", 42)))
    if "threads" in plan.runtime_kwargs or "malloc" in plan.runtime_kwargs:
        from dlm.train import cpu_runtime

        emit("cpu_runtime", cpu_runtime.apply(plan.runtime_kwargs, plan.world_size))
    emit("load", {"base": str(base_folder)})
    model, tokenizer = load_base(base_folder, plan, trust_remote_code)
    emit("loaded", {"params": sum(p.numel() for p in model.parameters())})
    return model, tokenizer


def _make_rows(
    train_examples: Sequence[Example], heldout_examples: Sequence[Example], tokenizer: Any, emit: OnEvent
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """2. rows: (train, held-out) TRL rows; there must be something to train on."""
    train_rows, held_rows = rows(train_examples, tokenizer), rows(heldout_examples, tokenizer)
    emit("rows", {"train": len(train_rows), "heldout": len(held_rows)})
    if not train_rows:
        raise DlmError(
            "there is nothing to train on: every example is held out or the corpus is empty",
            "add examples, or lower training.eval_fraction",
        )
    return train_rows, held_rows


def _trainer(
    plan: Plan,
    args: Any,
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, str]],
    held_rows: list[dict[str, str]],
    callbacks: list[Any],
    emit: OnEvent,
) -> Any:
    """3. wrap: TRL applies the LoraConfig and prepares (tokenizes, masks) the datasets."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(held_rows) if held_rows else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(**plan.lora_kwargs),
        callbacks=callbacks,
    )
    # The Trainer's own console output (a printed dict per log, or a tqdm bar) is render.py's job.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _dora_forward(plan: Plan, model: Any, emit: OnEvent) -> list[dict[str, Any]]:
    """3b. dlm's DoRA forward when the plan chose it (branch dropout, no second base matmul; with
    "dora_norm": "factored", the row norm from factors), if its guards pass: PEFT's version and a
    parity self-check in the run's precision. Otherwise PEFT's stays, and the warn finding is returned."""
    if plan.runtime_kwargs.get("dora_dropout") != "branch":
        return []
    from dlm.train.dora_fast import switch_on

    kw = plan.sft_kwargs
    precision = "bf16" if kw.get("bf16") else "fp16" if kw.get("fp16") else "fp32"  # the Trainer's autocast
    switch = switch_on(model, factored_norm=plan.runtime_kwargs.get("dora_norm") == "factored", precision=precision)
    emit("dora_forward", switch.event())
    finding = switch.finding()
    return [finding] if finding else []


def _param_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _train(trainer: Any, loop: LoopState, resume_from: Path | None) -> None:
    """4. train, from the checkpoint when resuming. A signal that came while loading means: stop
    before the first step."""
    if loop.signal is None:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    else:
        loop.interrupted = True


@dataclass(frozen=True)
class _Ending:
    """How training ended and what was kept: held-out losses and the adapter folder when "ok"."""

    status: Status
    message: str = ""
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    adapter_dir: str | None = None
    learning: dict[str, Any] | None = None
    preference: dict[str, Any] | None = None
    phases: tuple[dict[str, Any], ...] = ()


def _phase(name: str, state: Any, loop: LoopState) -> dict[str, Any]:
    """One phase's figures for the summary: its steps, its last loss, its log entries."""
    return {
        "phase": name,
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "train_loss": loop.loss,
        "log": list(state.log_history),
    }


def _sft_done(model: Any, resumed_run: Path, out_dir: Path, loop: LoopState, emit: OnEvent) -> dict[str, Any]:
    """4a. Resuming a two-phase run in its DPO phase: the SFT phase is not trained again. Its final
    checkpoint's adapter goes into the model the SFT trainer just wrapped (the wrapping an uninterrupted
    run trained in), and its figures come from that checkpoint's trainer_state.json. The checkpoint is
    carried into this run's `checkpoints/` (hard links where the file system allows), so that a second
    interruption resumes the same way."""
    from transformers import TrainerState

    source = sft_final(resumed_run)
    if source is None:  # `store.resume.check_resume` refuses this before anything is written
        raise DlmError(
            f"cannot resume the DPO phase of {resumed_run.name}: no final checkpoint of its SFT phase",
            "train with --fresh",
        )
    own = out_dir / CHECKPOINTS / source.name
    if source.resolve() != own.resolve():
        shutil.rmtree(own, ignore_errors=True)
        shutil.copytree(source, own, copy_function=_link_or_copy)
    model.load_adapter(str(source), "default", is_trainable=True)
    model.set_adapter("default")
    state = TrainerState.load_from_json(str(source / "trainer_state.json"))
    losses = [e["loss"] for e in state.log_history if "loss" in e]
    loop.loss = float(losses[-1]) if losses else None
    emit("sft_done", {"checkpoint": str(source), "step": state.global_step})
    return _phase("sft", state, loop)


def _link_or_copy(src: str, dst: str) -> None:
    """A checkpoint's files are never rewritten in place: a hard link is as good as a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _dpo_phase(
    plan: Plan,
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[Example],
    heldout_examples: Sequence[Example],
    out_dir: Path,
    loop: LoopState,
    resume_from: Path | None,
    max_steps: int | None,
    callbacks: list[Any],
    emit: OnEvent,
) -> tuple[Any, Any]:
    """4b. DPO on the preference triples: on the base with a new adapter (DPO only: resumable from
    `checkpoints/`, as SFT), or on the SFT phase's adapter (its checkpoints go to `checkpoints-dpo/`,
    resumable from there: the trainer is built on the SFT phase's final adapter, so reference: sft's
    frozen copy is that adapter, then the checkpoint restores the trained one). `resume_from`: the
    DPO checkpoint to continue, or None. Returns (trainer, args) once trained."""
    from dlm.train import preference

    train = [e for e in train_examples if e.kind == "preference"]
    held = [e for e in heldout_examples if e.kind == "preference"]
    train_rows, held_rows = preference.pair_rows(train, tokenizer), preference.pair_rows(held, tokenizer)
    emit("rows", {"train": len(train_rows), "heldout": len(held_rows), "phase": "dpo"})
    mismatch = preference.template_mismatch(train_rows + held_rows, train + held, tokenizer)
    if mismatch:
        loop.findings.append(mismatch)
        emit("finding", mismatch)
    only = plan.phases == ("dpo",)
    folder = out_dir / (CHECKPOINTS if only else DPO_CHECKPOINTS)
    args = preference.dpo_config(plan, folder, max_steps=max_steps, has_eval=bool(held_rows))
    trainer = preference.dpo_trainer(plan, args, model, tokenizer, train_rows, held_rows, callbacks)
    keep_every_rank_rng(trainer)
    if only:
        loop.findings.extend(_dora_forward(plan, trainer.model, emit))
    else:
        emit("phase", {"phase": "dpo", "index": 2, "of": 2})
        loop.phase = "dpo"
    loop.loss = None
    _train(trainer, loop, resume_from)
    if "ref" in trainer.model.peft_config:  # reference: sft's frozen copy is not part of the adapter saved
        trainer.model.delete_adapter("ref")
        trainer.model.set_adapter("default")
    return trainer, args


def _preference(
    model: Any,
    tokenizer: Any,
    ending: _Ending,
    plan: Plan,
    train: Sequence[Example],
    heldout: Sequence[Example],
    seed: int,
    emit: OnEvent,
) -> _Ending:
    """5a. preference accuracy and reward margin on every held-out triple and a sample of training ones."""
    from dlm.train import preference

    beta = float(plan.dpo_kwargs.get("beta", 0.1))
    max_length = plan.dpo_kwargs.get("max_length")
    held = [e for e in heldout if e.kind == "preference"]
    found = {
        "beta": beta,
        "reference": plan.reference,
        "heldout": preference.measure(model, tokenizer, held, beta=beta, max_length=max_length),
        "train": preference.measure(
            model, tokenizer, preference.sample(train, preference.TRAIN_SAMPLE, seed), beta=beta, max_length=max_length
        ),
    }
    emit("preference", found)
    return replace(ending, preference=found)


def _judge_and_save(
    model: Any,
    tokenizer: Any,
    loop: LoopState,
    *,
    heldout: Sequence[Example],
    max_length: int | None,
    eval_base: bool,
    target: Path,
    emit: OnEvent,
) -> _Ending:
    """5. judge and save: only a complete, finite run is scored on `heldout` and becomes an adapter folder."""
    status: Status = "interrupted" if loop.interrupted else "ok"
    if loop.failed or (status == "ok" and not _finite_adapter(model)):
        return _Ending("failed", loop.failed or "the adapter's weights are not finite")
    if status != "ok":
        return _Ending(status)
    eval_l = base_l = None
    if heldout:
        from dlm.train.evaluate import eval_loss

        eval_l = eval_loss(model, tokenizer, heldout, max_length=max_length)
        if eval_base:
            with model.disable_adapter():
                base_l = eval_loss(model, tokenizer, heldout, max_length=max_length)
        emit("eval", {"eval_loss": eval_l, "base_eval_loss": base_l})
    adapter_dir = str(_save_adapter(model, tokenizer, target))
    emit("saved", {"adapter": adapter_dir})
    return _Ending("ok", eval_loss=eval_l, base_eval_loss=base_l, adapter_dir=adapter_dir)


def _learning(
    model: Any,
    tokenizer: Any,
    ending: _Ending,
    train: Sequence[Example],
    heldout: Sequence[Example],
    report: int,
    seed: int,
    emit: OnEvent,
) -> _Ending:
    """5b. the learning report: greedy answers of the saved adapter and of the base, scored."""
    from dlm.train.learning import learning_report

    emit("report_begin", {"questions": min(report, sum(e.kind != "prose" for e in train))})
    found = learning_report(
        model,
        tokenizer,
        train,
        heldout,
        sample=report,
        seed=seed,
        heldout_loss=ending.eval_loss,
        base_heldout_loss=ending.base_eval_loss,
    ).to_json()
    emit("report", {"line": found["line"], "learning": found})
    return replace(ending, learning=found)


def _summarise(state: Any, loop: LoopState, ending: _Ending, params: tuple[int, int], seconds: float) -> RunSummary:
    """6. summarise: the Trainer's state, the loop's measurements and how it ended."""
    return RunSummary(
        status=ending.status,
        steps=sum(p["steps"] for p in ending.phases) if len(ending.phases) > 1 else state.global_step,
        max_steps=sum(p["max_steps"] for p in ending.phases) if len(ending.phases) > 1 else state.max_steps,
        train_loss=loop.loss,
        eval_loss=ending.eval_loss,
        base_eval_loss=ending.base_eval_loss,
        seconds=seconds,
        steady_step_seconds=steady_step_seconds(loop.step_times),
        tokens_seen=loop.tokens,
        peak_memory_bytes=peak_memory(),
        trainable_params=params[0],
        total_params=params[1],
        adapter_dir=ending.adapter_dir,
        checkpoint=loop.checkpoint,
        message=ending.message,
        log_history=tuple(e for p in ending.phases for e in p["log"])
        if len(ending.phases) > 1
        else tuple(state.log_history),
        learning=ending.learning,
        preference=ending.preference,
        phases=ending.phases,
        findings=tuple(loop.findings),
    )


def _save_adapter(model: Any, tokenizer: Any, target: Path) -> Path:
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors), swapped in whole."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=target.parent))
    try:
        model.save_pretrained(str(tmp))
        if tokenizer.pad_token == ADDED_PAD:  # the vocabulary grew: the base's tokenizer no longer fits
            tokenizer.save_pretrained(str(tmp))
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
