"""The `dlm` command line: option declarations, one call each, then render.

Every `DlmError` is caught once, in `main`: `path:line:col: message` and `hint:` on stderr, exit 2
for bad input and 1 for a failed or blocked run. Anything else is a bug and keeps its traceback.
Heavy libraries are imported only inside the commands that train, so `dlm --help`, `dlm schema`
and `dlm doctor FILE` stay instant.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from dlm import __version__
from dlm.cli import render
from dlm.errors import DlmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn one authored document into a fine-tuned adapter, with every knob explained.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


class State:
    home: Path = Path(os.environ.get("DLM_HOME") or Path.home() / ".dlm")
    verbosity: int = 0


def _version(value: bool) -> None:
    if value:
        out.print(f"dlm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _global(
    home: Annotated[
        Path | None, typer.Option("--home", help="Store and bases folder (default $DLM_HOME or ~/.dlm).")
    ] = None,
    verbose: Annotated[int, typer.Option("-v", "--verbose", count=True, help="More detail.")] = 0,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only errors and results.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if home is not None:
        State.home = home.expanduser().resolve()
    State.verbosity = -1 if quiet else verbose


def _hardware(fixture: Path | None):
    from dlm.plan import hardware

    if fixture is None:
        return hardware.probe_light()
    try:
        return hardware.load_fixture(fixture)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DlmError(
            f"cannot read hardware file: {exc}",
            "pass a file written by `dlm doctor --json` (its hardware object)",
            str(fixture),
        ) from None


def _probed(files: list[Path] | None, steps: int, hardware_file: Path | None):
    """`doctor --probe N`: this machine, probed as `dlm train` probes it; each file measured in turn."""
    from dlm.train import device
    from dlm.train.probe import probe_file

    if not files or hardware_file is not None:
        raise DlmError("--probe trains a few steps of a document on this machine", "pass a file, and no --hardware")
    hw = device.probe()
    if State.verbosity >= 0:
        err.print(f"probing: {steps} training steps per file (nothing is saved)...", highlight=False)
    return hw, [probe_file(f, hw, State.home, steps) for f in files]


@app.command()
def doctor(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Documents (.dlm) or specs (.yaml) to plan.", show_default=False)
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Stable JSON (docs/cli.md) instead of tables.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on any warning, not only on a block.")] = False,
    hardware_file: Annotated[
        Path | None, typer.Option("--hardware", help="Plan for another machine: a HardwareFacts JSON file.")
    ] = None,
    probe: Annotated[
        int | None,
        typer.Option(
            "--probe",
            min=3,
            help="Train N real steps (nothing is saved) and show measured step time, total and peak memory instead of estimates.",
        ),
    ] = None,
) -> None:
    """Report the environment, or audit each document's plan before any weights load."""
    from dlm.plan.doctor import diagnose, environment_report

    if probe is not None:
        hw, results = _probed(files, probe, hardware_file)
    else:
        hw = _hardware(hardware_file)
    if not files:
        report = environment_report(hw, State.home)
        render.as_json(out, report) if json_out else render.environment(out, report)
        return
    if probe is None:
        results = [diagnose(f, hw, State.home) for f in files]
    if json_out:
        render.as_json(out, {"dlm": __version__, "hardware": hw.to_json(), "files": [r.to_json() for r in results]})
    else:
        for r in results:
            render.plan(out, r.path, r.plan, r.base, hw, r.corpus)
            if r.probe is not None:
                render.probe(out, r.probe)
    blocked = any(r.plan.blocked for r in results)
    warned = any(f.level == "warn" for r in results for f in r.plan.findings)
    raise typer.Exit(1 if blocked or (strict and warned) else 0)


@app.command()
def init(
    file: Annotated[Path, typer.Argument(help="The new document to write.")],
    base: Annotated[str, typer.Option("--base", help="base_model: alias, hub id, folder or .gguf.")] = "smollm2-135m",
    adapter: Annotated[str, typer.Option("--adapter", help="lora | qlora | dora")] = "lora",
) -> None:
    """Write a commented scaffold with a fresh dlm_id. Never overwrites."""
    from dlm.doc.authoring import scaffold
    from dlm.doc.schema import new_id
    from dlm.fsutil import write_new

    if adapter not in ("lora", "qlora", "dora"):
        raise DlmError(f"--adapter must be lora, qlora or dora (got {adapter!r})", "for example: --adapter dora")
    write_new(file, scaffold(new_id(), base, adapter, file.stem.replace("-", " ").title()))
    out.print(f"wrote {file}; next: dlm doctor {file}")


@app.command()
def twin(
    file: Annotated[Path, typer.Argument(help="The document to copy.")],
    sets: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE override, e.g. training.adapter=dora (repeatable).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write the copy (default: NAME-VALUE.dlm).")
    ] = None,
) -> None:
    """Copy a document with a fresh dlm_id and the given overrides, validated before it is written."""
    from dlm.doc.authoring import make_twin

    target = make_twin(file, sets or [], output)
    out.print(f"wrote {target} (its own dlm_id); compare them with: dlm compare {file} {target}")


@app.command()
def migrate(
    file: Annotated[Path, typer.Argument(help="A document in DocumentLanguageModel's format.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the changes; write nothing.")] = False,
) -> None:
    """Rewrite a DocumentLanguageModel document in dlm's format, in place (FILE.bak keeps the original)."""
    from dlm.doc.migrate import migrate_file

    changes, backup = migrate_file(file, dry_run)
    for line in changes:
        out.print(f"{file}:{line}", highlight=False, soft_wrap=True)
    if not changes:
        out.print(f"{file}: already in dlm's format; nothing to change", highlight=False)
    elif backup is not None:
        out.print(f"rewrote {file} ({len(changes)} change(s)); the original is {backup}", highlight=False)
    else:
        out.print(f"dry run: {len(changes)} change(s), nothing written", highlight=False)


@app.command()
def pull(
    base: Annotated[str, typer.Argument(help="An alias (dlm doctor lists them), hf:org/name or org/name.")],
    revision: Annotated[str | None, typer.Option("--revision", help="A branch, tag or commit.")] = None,
) -> None:
    """Download a base into the Hugging Face cache (the one command that uses the network)."""
    from dlm.train.pull import pull as pull_base

    got = pull_base(base, revision)
    state = "already in the cache" if got.cached else "downloaded"
    out.print(f"{got.hub_id} {state}: commit {got.commit} at {got.folder}", highlight=False, soft_wrap=True)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the frontmatter (for editor completion)."""
    from dlm.doc.schema import json_schema

    render.as_json(out, json_schema())


_NOTES = {  # training events worth a line above the progress bar
    "load": lambda d: f"loading base {d['base']}",
    "dora_forward": lambda d: (
        f"DoRA: dlm's forward on {d['layers']} layers ({d['reason']})"
        if d["forward"] == "dlm"
        else f"DoRA: PEFT's own forward ({d['reason']})"
    ),
    "phase": lambda d: f"phase {d['index']}/{d['of']}: {d['phase']}",
    "sft_done": lambda d: f"resuming in the DPO phase: the SFT phase's adapter from {d['checkpoint']}",
    "finding": lambda d: f"{d['level']} {d['code']}: {d['message']}",
    "interrupt": lambda d: f"{d['signal']}: saving a checkpoint at the end of this step",
    "checkpoint": lambda d: f"checkpoint {d['path']}",
    "eval": lambda d: (
        "held-out loss "
        + (f"{d['eval_loss']:.4f}" if d.get("eval_loss") is not None else "-")
        + (f" (base {d['base_eval_loss']:.4f})" if d.get("base_eval_loss") is not None else "")
    ),
}


@dataclass
class _Handlers:
    """`dlm train`'s progress handlers: `on_plan` sets them once the plan (and so the step count) is known."""

    on_step: Callable[..., None] | None = None
    on_event: Callable[[str, dict], None] | None = None


def _progress(view: render.TrainView, total: int):
    """on_step / on_event handlers feeding the steady-state ETA (progress.py) and drawing it."""
    import time

    from dlm.train.progress import EtaEstimator

    eta = EtaEstimator(total)

    def on_event(kind: str, data: dict) -> None:
        if kind == "train_begin":
            eta.total_steps = data["max_steps"] or total
            eta.start(time.perf_counter(), data["step"])
        elif kind == "pause":
            eta.exclude(data["seconds"])
        elif kind in _NOTES and State.verbosity >= (1 if kind == "checkpoint" else 0):
            view.note(_NOTES[kind](data))

    def on_step(step: int, max_steps: int, loss: float | None, tokens: int, elapsed: float) -> None:
        now = time.perf_counter()
        eta.step(step, now, tokens)
        view.update(step, max_steps, loss, eta.tokens_per_second(), eta.eta(now))

    return on_step, on_event


@app.command()
def train(
    file: Annotated[Path, typer.Argument(help="The document (.dlm) or spec (.yaml) to train.")],
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after N optimizer steps.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run from its last checkpoint.")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over, leaving an interrupted run behind.")] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed", min=0, max=2**32 - 1, help="Train with this seed instead of training.seed (one more seed)."
        ),
    ] = None,
) -> None:
    """Plan, print the plan, train with TRL, and save a new version of the adapter."""
    from dlm.train import device, runs

    hw = device.probe()
    quiet = State.verbosity < 0 or runs.rank() != 0
    live = _Handlers()
    with ExitStack() as stack:  # the progress view, once entered, is exited however the run ends

        def on_plan(p) -> None:
            if not quiet:
                render.plan(out, p.doc.path, p.plan, p.base, hw, p.corpus)
            view = render.TrainView(out if not quiet else Console(quiet=True), p.plan.estimates.optimizer_steps)
            live.on_step, live.on_event = _progress(view, p.plan.estimates.optimizer_steps)
            stack.enter_context(view)

        outcome = runs.train_document(
            file,
            State.home,
            hw,
            max_steps=max_steps,
            resume=resume,
            fresh=fresh,
            seed=seed,
            on_plan=on_plan,
            on_step=lambda *a: live.on_step(*a) if live.on_step else None,
            on_event=lambda kind, data: live.on_event(kind, data) if live.on_event else None,
        )
    if not quiet:
        render.trained(out, outcome, State.home)
    raise typer.Exit(130 if outcome.summary.status == "interrupted" else 0)


def _questions(text: str | None, path: Path | None) -> list[str]:
    """`dlm prompt`'s questions: TEXT, or one per line of --file or of stdin (TEXT `-`, or no TEXT
    and stdin not a terminal); blank lines skipped."""
    if text is not None and path is not None:
        raise DlmError("give the questions one way: TEXT or --file, not both", "drop TEXT to read the file")
    if text is not None and text != "-":
        if not text.strip():
            raise DlmError("the question is empty", 'for example: dlm prompt notes.dlm "What is a decorator?"')
        return [text]
    if path is not None:
        try:
            body, source = path.read_text("utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise DlmError(
                f"cannot read the questions: {reason}", "pass a UTF-8 text file, one question per line", str(path)
            ) from None
    elif text == "-" or not sys.stdin.isatty():
        body, source = sys.stdin.read(), "stdin"
    else:
        raise DlmError(
            "no question", 'pass one (dlm prompt FILE "question"), --file PATH, or questions on stdin (TEXT -)'
        )
    questions = [line.strip() for line in body.splitlines() if line.strip()]
    if not questions and source == "stdin":
        raise DlmError("no questions on stdin", 'pipe one question per line, or pass one: dlm prompt FILE "question"')
    if not questions:
        raise DlmError("no questions in the file", "write one question per line (blank lines are skipped)", source)
    return questions


def prompt_findings(plan: Any) -> list[Any]:
    """The prompt plan's findings about answering (`PROMPT_CODES`), which `dlm prompt` and `dlm chat` show."""
    from dlm.plan.findings import PROMPT_CODES

    return [f for f in plan.findings if f.code in PROMPT_CODES]


def _loaded_for(file: Path, *, adapter: bool, base: bool):
    """The document's current version and its model, loaded once; a stale adapter is noted."""
    from dlm.store import current
    from dlm.train import basefolder
    from dlm.use import infer

    cur = current.current(file, State.home)
    if cur.stale and State.verbosity >= 0:
        err.print(f"note: {file} changed since {cur.version_dir.name} was trained; `dlm train {file}` refreshes it")
    if State.verbosity >= 0:
        render.finding_lines(err, prompt_findings(cur.prepared.plan))
    folder = basefolder.materialize(cur.prepared.base, State.home)
    trust = cur.prepared.spec.trust_remote_code
    return cur, infer.load_for_answers(cur.version_dir, folder, adapter=adapter, base=base, trust_remote_code=trust)


@app.command()
def prompt(
    file: Annotated[Path, typer.Argument(help="The trained document.")],
    text: Annotated[
        str | None,
        typer.Argument(
            help="The question; '-' reads one question per line from stdin (so does none, piped).", show_default=False
        ),
    ] = None,
    questions_file: Annotated[
        Path | None, typer.Option("--file", help="Questions, one per line (blank lines skipped).")
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Answer with the base alone (adapter off).")] = False,
    side_by_side: Annotated[
        bool, typer.Option("--side-by-side", help="The base's and the adapter's answers together for each question.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Stable JSON (docs/cli.md) instead of text.")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=8192, help="Most new tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=5.0, help="0 = greedy.")] = 0.0,
) -> None:
    """Answer with the current adapter (or the base, or both), the chat template and system prompt as
    in training; every question in one model load."""
    from dlm.use import infer

    if base and side_by_side:
        raise DlmError(
            "--side-by-side already shows the base's answers",
            "use --side-by-side alone for both, --base alone for the base's",
        )
    questions = _questions(text, questions_file)
    sides = ("base", "adapter") if side_by_side else ("base",) if base else ("adapter",)
    cur, loaded = _loaded_for(file, adapter="adapter" in sides, base="base" in sides)
    answers = infer.answer(
        loaded,
        questions,
        cur.prepared.spec.system_prompt,
        sides=sides,
        max_new_tokens=max_tokens,
        temperature=temperature,
    )
    if json_out:
        findings = [
            {"level": f.level, "code": f.code, "message": f.message} for f in prompt_findings(cur.prepared.plan)
        ]
        render.as_json(
            out,
            {
                "dlm_prompt": 1,
                "version": cur.version_dir.name,
                "stale": cur.stale,
                "findings": findings,
                "answers": answers,
            },
        )
    else:
        render.answers(out, answers, sides)


def _typed_lines(prompt: Callable[[], str]):
    """Lines typed into `dlm chat`: after a prompt on a terminal, plain lines from a pipe; EOF ends."""
    if not sys.stdin.isatty():
        yield from iter(sys.stdin.readline, "")
        return
    while True:
        try:
            yield input(prompt())
        except EOFError:
            out.print()
            return


@app.command()
def chat(
    file: Annotated[Path, typer.Argument(help="The trained document.")],
    system: Annotated[
        str | None, typer.Option("--system", help="System prompt (default: the document's, as in training).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=8192, help="Most new tokens per answer.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, max=5.0, help="0 = greedy.")] = 0.0,
) -> None:
    """Talk with the current adapter, loaded once: /base switches it off, /adapter on, /reset forgets
    the conversation, /system TEXT sets the system prompt, /quit (or EOF) ends."""
    from dlm.use import infer

    cur, loaded = _loaded_for(file, adapter=True, base=True)
    session = infer.Chat(loaded, cur.prepared.spec.system_prompt if system is None else system, max_tokens, temperature)
    if State.verbosity >= 0:
        err.print(
            f"chat with {cur.version_dir.name} of {escape(str(file))}; {infer.CHAT_HELP}",
            highlight=False,
            soft_wrap=True,
        )
    for line in _typed_lines(lambda: "> " if session.adapter else "base> "):
        try:
            turn = infer.chat_turn(session, line)
        except KeyboardInterrupt:  # Ctrl-C stops this answer; Ctrl-D or /quit ends the session
            if not sys.stdin.isatty():
                raise
            turn = infer.Turn("note", "answer interrupted; the conversation is as it was")
        if turn.kind == "quit":
            break
        render.chat_turn(out, err, turn)


@app.command()
def show(
    file: Annotated[Path, typer.Argument(help="The document whose store to list.")],
    json_out: Annotated[bool, typer.Option("--json", help="Stable JSON (docs/cli.md).")] = False,
) -> None:
    """The store: current adapter, versions and runs with their metrics. Exit 1 if the current one is damaged."""
    from dlm.store import current

    info = current.describe(file, State.home)
    render.as_json(out, info) if json_out else render.store_listing(out, info)
    if info["damaged"]:
        err.print(escape(info["damaged"]), highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def export(
    file: Annotated[Path, typer.Argument(help="The trained document.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new (or empty) folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="hf | gguf | ollama | peft (docs/export.md)")] = "hf",
    quant: Annotated[str | None, typer.Option("--quant", help="gguf/ollama: f32 | f16 (default) | bf16 | q8_0")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="hf: float32 | bfloat16 | float16 (default: as trained)")
    ] = None,
) -> None:
    """Write the current adapter where people run it: a merged HF folder, a GGUF file, an Ollama
    folder or the PEFT adapter alone; each with a model card (README.md)."""
    from dlm.store import current
    from dlm.use import export as exporting

    exporting.check_options(fmt, quant, dtype)  # before the store is read or anything loads
    exporting.refuse_non_empty(output)
    cur = current.current(file, State.home)
    done = exporting.export(cur, State.home, fmt, output, quant=quant, dtype=dtype)
    if State.verbosity >= 0:
        render.finding_lines(err, done.findings)
    out.print(
        f"wrote {done.out_dir} ({', '.join(done.files)}; {cur.version_dir.name} of {cur.prepared.spec.base_model})",
        highlight=False,
        soft_wrap=True,
    )
    if done.ollama_create:
        out.print(done.ollama_create, highlight=False, soft_wrap=True)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="The baseline document (the cheaper side, e.g. LoRA).")],
    b: Annotated[Path, typer.Argument(help="Its twin (e.g. DoRA), which must earn its extra cost.")],
    metric: Annotated[
        str,
        typer.Option(
            "--metric",
            help="eval_loss (lower is better) | delta_kl | answer_f1 | exact_match (the learning report's held-out answers; higher is better) | pref_accuracy | reward_margin (objective dpo).",
        ),
    ] = "eval_loss",
    min_gain: Annotated[float, typer.Option("--min-gain", help="B must beat A by this fraction (0.05 = 5%).")] = 0.05,
    gate: Annotated[
        bool, typer.Option("--gate", help="Exit 1 on `keep A`, and on `inconclusive` unless --inconclusive pass (CI).")
    ] = False,
    inconclusive: Annotated[
        str, typer.Option("--inconclusive", help="What --gate does with an inconclusive verdict: fail | pass.")
    ] = "fail",
    json_out: Annotated[bool, typer.Option("--json", help="Stable JSON (docs/compare.md) instead of tables.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Also draw loss curves and metric/cost bars into this PNG.")
    ] = None,
    train: Annotated[
        bool, typer.Option("--train", help="First train a side that has no adapter or a stale one.")
    ] = False,
    allow_different_data: Annotated[
        bool,
        typer.Option("--allow-different-data", help="Compare twins whose corpora differ, on A's held-out examples."),
    ] = False,
    seeds: Annotated[
        int, typer.Option("--seeds", help="Judge N training seeds per side (seed, seed+1, ...; --train trains them).")
    ] = 1,
) -> None:
    """Score the base, A and B on A's held-out examples and say whether B's gain pays for its cost."""
    from dlm.use import compare as comparing

    if inconclusive not in ("fail", "pass"):
        raise DlmError(f"--inconclusive must be fail or pass (got {inconclusive!r})", "--gate --inconclusive pass")
    if plot is not None and plot.suffix.lower() != ".png":
        raise DlmError(f"--plot writes a PNG file (got {plot})", "for example: --plot compare.png")

    def on_train(role: str, path: str, why: str) -> None:
        if State.verbosity >= 0:
            err.print(f"training {role} ({escape(path)}): {why}", highlight=False)

    result = comparing.compare(
        a,
        b,
        State.home,
        metric=metric,
        min_gain=min_gain,
        train=train,
        on_train=on_train,
        allow_different_data=allow_different_data,
        seeds=seeds,
    )
    render.as_json(out, result.to_json()) if json_out else render.comparison(out, result)
    if plot is not None:
        from dlm.cli.plot import comparison_png

        comparison_png(result, plot)
        err.print(f"plot: {escape(str(plot))}", highlight=False) if State.verbosity >= 0 else None
    outcome = result.verdict.outcome
    raise typer.Exit(
        1 if gate and (outcome == "keep A" or (outcome == "inconclusive" and inconclusive == "fail")) else 0
    )


# typer >= 0.29 vendors click; find its exception base through a public class either way.
_ClickException: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except DlmError as exc:
        render.error(err, exc)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(130)
    except _ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code not in (0, 1) else exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
