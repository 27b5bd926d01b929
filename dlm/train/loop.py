"""The plumbing around the Trainer's loop, for `dlm.train.run`: the progress callback, signals, quiet bars.

- `LoopState`: what the callback, the signal handlers and `run` share during one run.
- `progress_callback`: a `TrainerCallback` that times every optimizer step, writes `log.jsonl`,
  forwards progress (`on_step`, `on_event`; the kinds are listed in `dlm.train.run`'s docstring) and
  turns a received signal into "save a checkpoint and stop" at the next step boundary, on every rank.
- `stop_on_signals`: SIGINT / SIGTERM handlers for the duration of a run.
- `quiet_progress`: the libraries' own tqdm bars and deprecation chatter off for a block.
- `trim_log`: on resume, the log lines of steps that will be redone are dropped.
- `keep_every_rank_rng`: under several processes, every rank's RNG state goes into the checkpoint
  that a resume reads (rank 0's, in the store), not only rank 0's.

transformers, datasets and torch are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlm.train.progress import steady_step_seconds

OnStep = Callable[[int, int, "float | None", int, float], None]
OnEvent = Callable[[str, dict], None]
SECOND_SIGNAL_S = 1.0  # a repeat SIGINT sooner than this is the same Ctrl-C, forwarded by a launcher


@dataclass
class LoopState:
    """One run's training state, written by the progress callback and the signal handlers, read by `run`.

    Mutable on purpose: the Trainer calls the callback from inside its loop, and a signal handler can
    only leave a mark for the next step boundary.
    """

    loss: float | None = None  # the latest logged training loss (None before the first log)
    tokens: int = 0  # tokens seen so far, from TRL's `num_tokens` at the latest log
    t_log: float = 0.0  # seconds since training began, at the latest loss log (for tokens/s)
    step_times: list[float] = field(default_factory=list)  # each optimizer step's compute seconds
    checkpoint: str | None = None  # the newest checkpoint folder (the one resumed from, until a save)
    signal: int | None = None  # the first SIGINT / SIGTERM received, or None
    signal_at: float = 0.0  # when it came (`time.monotonic`)
    interrupted: bool = False  # stopped on a signal: a checkpoint was saved at a step boundary
    failed: str | None = None  # why the run failed (a non-finite loss), or None
    t_train: float | None = None  # `time.monotonic()` when training began
    t_step: float = 0.0  # `time.perf_counter()` when the step under way began
    t_mark: float | None = None  # `time.perf_counter()` when the last step or pause ended
    findings: list[dict[str, Any]] = field(default_factory=list)  # run-time findings, for RunSummary.findings
    phase: str | None = None  # a two-phase run's phase under way ("sft" | "dpo"), marked on its log entries


def _elapsed(loop: LoopState) -> float:
    """Wall seconds since training began (0 before it has)."""
    return 0.0 if loop.t_train is None else time.monotonic() - loop.t_train


def _since_mark(loop: LoopState) -> float:
    """Seconds since the last step ended (or the last pause): the pause that just ended."""
    now = time.perf_counter()
    seconds, loop.t_mark = now - (now if loop.t_mark is None else loop.t_mark), now
    return seconds


def trim_log(log_path: Path, upto_step: int, phase: str | None = None) -> None:
    """On resume, drop log lines written after the checkpoint (steps that will be redone).

    A two-phase run's lines carry their `phase` and each phase counts steps from 1: resuming in the
    DPO phase keeps every SFT line; resuming in the SFT phase (`phase` "sft") drops every DPO line."""
    if not log_path.is_file():
        return

    def kept(entry: dict[str, Any]) -> bool:
        early = entry.get("step", 0) <= upto_step
        if phase == "dpo":
            return entry.get("phase") != "dpo" or early
        return early and not (phase == "sft" and entry.get("phase") == "dpo")

    keep = [ln for ln in log_path.read_text().splitlines() if ln.strip() and kept(json.loads(ln))]
    log_path.write_text("".join(ln + "\n" for ln in keep))


def progress_callback(loop: LoopState, log_path: Path, on_step: OnStep | None, on_event: OnEvent) -> Any:
    """A TrainerCallback that times steps, writes log.jsonl, forwards progress and obeys signals."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            loop.t_train = time.monotonic()
            on_event("train_begin", {"step": state.global_step, "max_steps": state.max_steps})

        def on_step_begin(self, args, state, control, **kw):
            loop.t_step = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            loop.t_mark = time.perf_counter()
            dt = loop.t_mark - loop.t_step
            loop.step_times.append(dt)
            on_event(
                "step_time", {"step": state.global_step, "seconds": dt, "steady": steady_step_seconds(loop.step_times)}
            )
            if _any_rank(loop.signal is not None, args):
                # Save here, at a step boundary, and stop: the Trainer writes a full checkpoint.
                control.should_save = True
                control.should_training_stop = True
                loop.interrupted = True
            if not control.should_log and on_step is not None:  # logged steps report from on_log with their loss
                on_step(state.global_step, state.max_steps, loop.loss, loop.tokens, _elapsed(loop))

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = _elapsed(loop)
            entry: dict[str, Any] = {"step": state.global_step, "seconds": round(now, 3)}
            if loop.phase:
                entry["phase"] = loop.phase
            if "loss" in logs:
                entry.update(_take_loss(loop, logs, now))
                if not math.isfinite(entry["loss"]):
                    loop.failed = f"training loss became {entry['loss']} at step {state.global_step}"
                    control.should_training_stop = True
            entry.update({k: v for k, v in logs.items() if k.startswith(("eval_", "rewards/"))})  # DPO: rewards/margins
            if len(entry) > 2 + bool(loop.phase):
                _append_log(log_path, entry)
                on_event("log", entry)
            if "loss" in logs and on_step is not None:
                on_step(state.global_step, state.max_steps, loop.loss, loop.tokens, now)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            on_event("pause", {"kind": "eval", "seconds": _since_mark(loop), "step": state.global_step})

        def on_save(self, args, state, control, **kw):
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            loop.checkpoint = str(path)
            on_event("pause", {"kind": "checkpoint", "seconds": _since_mark(loop), "step": state.global_step})
            on_event("checkpoint", {"path": str(path), "step": state.global_step})

    return Progress()


def _take_loss(loop: LoopState, logs: dict[str, Any], now: float) -> dict[str, Any]:
    """A training-loss log's fields for log.jsonl, tokens/s since the previous one; `loop` takes the
    new loss, token count and time."""
    loss = float(logs["loss"])
    tokens = int(logs.get("num_tokens", loop.tokens))
    # After a resume TRL's counter restarts at 0: count from there, never backwards.
    dtok = tokens - loop.tokens if tokens >= loop.tokens else tokens
    dsec = now - loop.t_log
    loop.loss, loop.tokens, loop.t_log = loss, tokens, now
    return {
        "loss": loss,
        "lr": logs.get("learning_rate"),
        "grad_norm": logs.get("grad_norm"),
        "tokens": tokens,
        "tokens_per_s": round(dtok / dsec, 1) if dsec > 0 else None,
        "epoch": logs.get("epoch"),
    }


def _append_log(log_path: Path, entry: dict[str, Any]) -> None:
    """One line of log.jsonl. Strict JSON: a NaN/inf loss is written as null (the run's message says what it was)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
    with log_path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(clean, allow_nan=False) + "\n")


def _any_rank(flag: bool, args: Any) -> bool:
    """Under torchrun / accelerate launch: did any rank get the signal? A Ctrl-C reaches the ranks
    at slightly different moments; if one stopped a step before the others, they would wait for it
    in the next gradient all-reduce forever. One tiny all-reduce per step makes them stop together."""
    if getattr(args, "world_size", 1) <= 1:
        return flag
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    seen = torch.tensor([int(flag)], device=args.device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return bool(seen.item())


def keep_every_rank_rng(trainer: Any) -> None:
    """Under several processes, put every rank's `rng_state_<rank>.pth` into the checkpoint a resume reads.

    The Trainer saves each process's RNG state into that process's own output folder, and reads each
    back from the checkpoint it resumes from. dlm gives ranks other than 0 a private folder (only rank
    0 writes the store), so on its own a resumed run would restore rank 0's RNG alone, and the other
    ranks would draw other dropout masks than an uninterrupted run. Here the Trainer's RNG save is
    followed by one gather: rank 0 writes every rank's file beside its own. `_save_checkpoint` saves
    the RNG state before `trainer_state.json`, the checkpoint's completion mark, so a checkpoint that
    counts as complete holds every rank's file. One process: nothing changes."""
    if getattr(trainer.args, "world_size", 1) <= 1:
        return
    save = trainer._save_rng_state  # transformers 5.x: `_save_checkpoint` calls it on every rank

    def save_every_rank(output_dir: str) -> None:
        save(output_dir)
        _gather_rng_files(Path(output_dir), trainer.args)

    trainer._save_rng_state = save_every_rank


def _gather_rng_files(folder: Path, args: Any) -> None:
    """Every rank sends the bytes of the RNG file it just wrote; the saving process writes them all
    into `folder` (atomically; a file already there with the same bytes, a shared folder, is left)."""
    import os
    import tempfile

    import torch
    import torch.distributed as dist

    own = (folder / f"rng_state_{args.process_index}.pth").read_bytes()
    device = args.device  # NCCL gathers only CUDA tensors; gloo takes CPU ones
    data = torch.frombuffer(bytearray(own), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)  # tensors, not pickled objects: dlm never unpickles
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    if not args.should_save:
        return
    for rank, (part, n) in enumerate(zip(parts, sizes, strict=True)):
        blob = part[: int(n.item())].cpu().numpy().tobytes()
        target = folder / f"rng_state_{rank}.pth"
        if target.is_file() and target.read_bytes() == blob:
            continue
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def quiet_progress(*, datasets: bool = True) -> Iterator[None]:
    """Switch off the libraries' own tqdm bars (weights loading, dataset mapping) and their
    deprecation chatter for a block: render.py draws dlm's progress, and stray output would tear
    through it. (bitsandbytes logs a warning about an optional CPU kernel package on import; the
    4-bit path works without it.) `datasets=False` leaves the datasets library alone and unimported:
    answering (`dlm prompt`, `dlm chat`) never needs it, and importing it costs a second."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    ds_bars = False
    if datasets:
        import datasets as ds

        ds_bars = ds.is_progress_bar_enabled()
        ds.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if hf_bars:
            hf_logging.enable_progress_bar()
        if ds_bars:
            import datasets as ds

            ds.enable_progress_bars()


def trainer_args(config: Any, kwargs: dict[str, Any], output_dir: Path, max_steps: int | None, has_eval: bool) -> Any:
    """`config(output_dir=..., **kwargs)` (TRL's SFTConfig or DPOConfig) with the run mechanics the plan
    leaves unsaid: no tqdm (render.py draws), NaN losses logged as NaN (so the run can stop on them),
    a few checkpoints kept; `max_steps` (a CLI `--max-steps`) overrides the plan's length, and with no
    held-out rows periodic evaluation is switched off."""
    kwargs = dict(kwargs)
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    if not has_eval:
        kwargs["eval_strategy"] = "no"
        kwargs.pop("eval_steps", None)
    kwargs.setdefault("disable_tqdm", True)
    kwargs.setdefault("logging_nan_inf_filter", False)
    kwargs.setdefault("save_total_limit", 3)
    return config(output_dir=str(output_dir), **kwargs)


@contextmanager
def stop_on_signals(loop: LoopState, on_event: OnEvent) -> Iterator[None]:
    """SIGINT/SIGTERM -> `loop.signal`, which the progress callback turns into "save a checkpoint and
    stop" at the next step boundary; a second SIGINT aborts at once. The previous handlers come back
    afterwards. Python only delivers signals to the main thread: elsewhere the block runs without
    handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if loop.signal is not None:
            # A launcher (torchrun, accelerate) forwards the terminal's Ctrl-C, so one keypress can
            # arrive twice within moments: only a second SIGINT a while later means "abort now".
            if signum == signal.SIGINT and time.monotonic() - loop.signal_at > SECOND_SIGNAL_S:
                raise KeyboardInterrupt
            return
        loop.signal, loop.signal_at = signum, time.monotonic()
        on_event("interrupt", {"signal": signal.Signals(signum).name})

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, prev in previous.items():
            signal.signal(sig, prev)
