"""Every table, panel and progress bar dlm draws. Renders values; decides nothing.

Imports only data types; never torch, never train. All output goes through a `Console` handed in,
so tests can capture it and `--json` paths never touch rich.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from dlm.errors import DlmError

LEVEL_STYLE = {"info": "cyan", "warn": "yellow", "block": "bold red"}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def error(console: Console, err: DlmError) -> None:
    """`path:line:col: message` and `hint:` lines, unstyled so they can be grepped and parsed."""
    console.print(escape(err.render()), highlight=False, soft_wrap=True)


def kwargs_call(name: str, kwargs: dict[str, Any]) -> str:
    body = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{name}({body})"


def environment(console: Console, report: dict[str, Any]) -> None:
    table = Table(title="dlm doctor: environment", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in report.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        table.add_row(key, escape(str(value)))
    console.print(table)


def plan(console: Console, path: str, plan: Any, base: Any, hardware: Any, corpus: Any) -> None:
    """The whole plan: header, decisions with reasons, library kwargs, estimates, findings, reason."""
    console.print(
        f"[bold]{escape(path)}[/]  base [bold]{escape(base.name)}[/] ({base.params_label}, {base.model_type}, "
        f"{base.n_layers} layers)  on [bold]{hardware.device}[/] {escape(hardware.name)} "
        f"({gib(hardware.memory_bytes)}, {hardware.cores} cores)",
        highlight=False,
    )
    pinned = "; held out: the pinned sections" if corpus.n_pinned else ""
    tokens = f"{'' if corpus.exact else '~'}{corpus.train_tokens} training tokens ({corpus.counted})"
    console.print(
        escape(
            f"corpus: {corpus.n_train} training / {corpus.n_heldout} held-out examples "
            f"({corpus.n_prose} prose, {corpus.n_instruction} instruction{pinned}), {tokens}"
        ),
        highlight=False,
    )
    table = Table(title="decisions", title_justify="left", show_lines=False)
    table.add_column("knob", style="bold")
    table.add_column("value")
    table.add_column("why", overflow="fold")
    for d in plan.decisions:
        table.add_row(d.key, escape(str(d.value)), escape(d.reason))
    console.print(table)
    console.print(escape(kwargs_call("LoraConfig", plan.lora_kwargs)), highlight=False, soft_wrap=True)
    console.print(escape(kwargs_call("SFTConfig", plan.sft_kwargs)), highlight=False, soft_wrap=True)
    if plan.dpo_kwargs:  # objective dpo: the DPO phase's config (docs/preference.md)
        console.print(escape(kwargs_call("DPOConfig", plan.dpo_kwargs)), highlight=False, soft_wrap=True)
    console.print(escape(kwargs_call("from_pretrained", plan.model_kwargs)), highlight=False, soft_wrap=True)
    if getattr(plan, "runtime_kwargs", None):  # settings train.py applies itself
        console.print(escape(kwargs_call("runtime", plan.runtime_kwargs)), highlight=False, soft_wrap=True)
    est = plan.estimates
    label = "measured" if est.measured else "estimated"
    console.print(
        f"{label}: {est.optimizer_steps} optimizer steps x {est.tokens_per_step} tokens, "
        + (f"then {plan.decision('dpo_steps')} DPO steps, " if getattr(plan, "phases", ()) == ("sft", "dpo") else "")
        + f"peak memory {gib(est.peak_memory_bytes)}, {est.step_seconds:.2f} s/step, "
        f"total {duration(est.total_seconds)}",
        highlight=False,
    )
    findings(console, plan.findings)
    console.print(escape(plan.reason), style="bold", highlight=False, soft_wrap=True)


def probe(console: Console, p: dict[str, Any]) -> None:
    """`doctor --probe`: what the steps measured, against the estimates they replaced."""
    console.print(
        f"probe: {p['steps']} steps in {duration(p['seconds'])}: {p['steady_step_seconds']:.2f} s/step "
        f"(estimated {p['estimated_step_seconds']:.2f}, x{p['step_ratio']:.2f}), peak memory "
        f"{gib(p['peak_memory_bytes'])} (estimated {gib(p['estimated_peak_memory_bytes'])}, x{p['memory_ratio']:.2f}), "
        f"{p['tokens_per_second']:.0f} tokens/s",
        highlight=False,
    )


def findings(console: Console, items: Any) -> None:
    if not items:
        console.print("findings: none", highlight=False)
        return
    table = Table(title="findings", title_justify="left")
    table.add_column("level")
    table.add_column("code", style="bold")
    table.add_column("what and fix", overflow="fold")
    for f in items:
        evidence = ", ".join(f"{k}={v}" for k, v in f.evidence.items())
        text = f"{escape(f.message)}\n[dim]fix:[/] {escape(f.hint)}"
        if evidence:
            text += f"\n[dim]evidence: {escape(evidence)}[/]"
        table.add_row(f"[{LEVEL_STYLE[f.level]}]{f.level}[/]", f.code, text)
    console.print(table)


def finding_lines(console: Console, items: Any) -> None:
    """Findings as one line each (`info dora-unmerged-inference: ...`), for commands that are not doctor."""
    for f in items:
        console.print(
            f"[{LEVEL_STYLE[f.level]}]{f.level}[/] {f.code}: {escape(f.message)}", highlight=False, soft_wrap=True
        )


def as_json(console: Console, data: Any) -> None:
    """Stable JSON: sorted keys, two-space indent, no rich markup."""
    console.file.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def panel(console: Console, title: str, body: str) -> None:
    console.print(Panel(escape(body), title=title, expand=False))


# --- training ------------------------------------------------------------------------------------


class TrainView:
    """The training progress: a rich bar on a terminal, one plain line per step (or every few) otherwise.

    Values come in computed (loss, tokens/s, ETA from `progress.EtaEstimator`); this class only draws.
    """

    def __init__(self, console: Console, total_steps: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console, self.total = console, max(1, total_steps)
        self.every = max(1, self.total // 20)  # plain lines: about twenty per run
        self._bar = None
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task("train", total=self.total, info="loading")

    def __enter__(self) -> TrainView:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()

    def note(self, text: str) -> None:
        (self._bar.console if self._bar is not None else self.console).print(
            escape(text), highlight=False, soft_wrap=True
        )

    def update(self, step: int, total: int, loss: float | None, tokens_per_s: float | None, eta: float | None) -> None:
        info = "  ".join(
            [
                f"loss {loss:.4f}" if loss is not None else "loss -",
                f"{tokens_per_s:,.0f} tok/s" if tokens_per_s else "- tok/s",
                f"ETA {duration(eta)}" if eta is not None else "ETA (warming up)",
            ]
        )
        if self._bar is not None:
            self._bar.update(self._task, completed=step, total=max(1, total), info=info)
        elif step % self.every == 0 or step >= total or step == 1:
            self.console.print(f"step {step}/{total}  {info}", highlight=False)


def trained(console: Console, outcome: Any, home: Any) -> None:
    s = outcome.summary
    for f in s.findings:  # run-time findings: where the run did not do what the plan said
        style = LEVEL_STYLE[f["level"]]
        console.print(f"[{style}]{f['level']}[/] {f['code']}: {escape(f['message'])}", highlight=False, soft_wrap=True)
    store = outcome.store.root
    if s.status == "interrupted":
        console.print(
            f"interrupted at step {s.steps}/{s.max_steps}; checkpoint {escape(str(s.checkpoint))}\n"
            f"continue with: dlm train {escape(outcome.prepared.doc.path)} --resume",
            highlight=False,
        )
        return
    loss = (
        f"held-out loss {s.eval_loss:.4f} (base {s.base_eval_loss:.4f})"
        if s.eval_loss is not None and s.base_eval_loss is not None
        else "no held-out examples"
    )
    steady = f"{s.steady_step_seconds:.2f} s/step steady" if s.steady_step_seconds else ""
    console.print(
        f"done: {s.steps} steps in {duration(s.seconds)} ({steady}), peak memory {gib(s.peak_memory_bytes)}, {loss}",
        highlight=False,
    )
    if s.learning:
        learning(console, s.learning)
    if s.preference:
        console.print(f"[bold]{preference_line(s.preference)}[/]", highlight=False, soft_wrap=True)
    console.print(f"version {outcome.version} -> {escape(str(store / 'adapter'))}", highlight=False)
    console.print(f"store: {escape(str(store))}", highlight=False)


def preference_line(found: dict[str, Any]) -> str:
    """`preference: held-out 5 triples: accuracy 0.80 (base 0.40), reward margin +0.412; training ...`"""
    parts = []
    for part, name in (("heldout", "held-out"), ("train", "training")):
        m = found.get(part) or {}
        if m.get("n"):
            parts.append(
                f"{name} {m['n']} triples: accuracy {m['pref_accuracy']:.2f} (base {m['base_pref_accuracy']:.2f}), "
                f"reward margin {m['reward_margin']:+.3f}"
            )
    return (
        "preference: "
        + ("; ".join(parts) or "no triples measured")
        + f" (beta {found.get('beta')}, ref {found.get('reference')})"
    )


def learning(console: Console, report: dict[str, Any], examples: int = 0) -> None:
    """The learning report's line, and (with `examples`) that many answers side by side."""
    console.print(f"[bold]{escape(report['line'])}[/]", highlight=False, soft_wrap=True)
    answers = [a for a in report.get("answers", []) if a["expected"]][:examples]
    if not answers:
        return
    table = Table(title="trained questions: base vs adapter (greedy)", title_justify="left", show_lines=True)
    for col in ("question", "document", "base", "adapter"):
        table.add_column(col, overflow="fold")
    for a in answers:
        mark = "[green]" if a["f1"] >= 0.8 else "[red]"
        table.add_row(
            escape(a["question"]), escape(a["expected"]), escape(a["base"]), f"{mark}{escape(a['adapter'])}[/]"
        )
    console.print(table)


def store_listing(console: Console, info: dict[str, Any]) -> None:
    """`dlm show`: the document's store, its versions and runs."""
    console.print(
        f"[bold]{escape(info['source'] or '')}[/]  dlm_id {info['dlm_id']}  base {escape(str(info['base']))}",
        highlight=False,
    )
    console.print(f"store: {escape(info['store'])}", highlight=False)
    current = info.get("current")
    console.print(
        f"current adapter: {current or 'none yet (dlm train FILE)'}"
        + ("  [yellow](stale: the document changed since)[/]" if info.get("stale") else ""),
        highlight=False,
    )
    table = Table(title="runs", title_justify="left")
    for col in ("run", "status", "version", "steps", "held-out loss (base)", "s/step", "time", "peak mem"):
        table.add_column(col)

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    notes = []
    for r in info["runs"]:
        m = r.get("metrics") or {}
        version = (r.get("version") or "-") + (" *" if r.get("version") and r.get("version") == current else "")
        loss = num(m.get("eval_loss"), ".4f") + (
            f" ({m['base_eval_loss']:.4f})" if isinstance(m.get("base_eval_loss"), (int, float)) else ""
        )
        table.add_row(
            r["run"],
            r["status"],
            version,
            num(m.get("steps"), "d"),
            loss,
            num(m.get("steady_step_seconds"), ".2f"),
            duration(m["seconds"]) if isinstance(m.get("seconds"), (int, float)) else "-",
            gib(m["peak_memory_bytes"]) if m.get("peak_memory_bytes") else "-",
        )
        if r.get("message") and r["status"] != "ok":
            notes.append(f"{r['run']} ({r['status']}, {r.get('started')}): {r['message']}")
    console.print(table)
    for v in info["versions"]:
        console.print(f"{v['version']}: {v['bytes'] / 2**20:.1f} MiB, run {v['run']}", highlight=False)
        if v.get("learning"):
            console.print(f"  {escape(v['learning']['line'])}", highlight=False, soft_wrap=True)
        if v.get("preference"):
            console.print(f"  {preference_line(v['preference'])}", highlight=False, soft_wrap=True)
    for note in notes:
        console.print(escape(note), highlight=False, soft_wrap=True)


# --- compare -------------------------------------------------------------------------------------


def comparison(console: Console, comp: Any) -> None:
    """`dlm compare`: base / A / B with every metric, the config differences, notes, the verdict line."""
    from rich import box

    from dlm.use.verdict import pct

    v = comp.verdict

    def num(x: Any, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, (int, float)) and x == x else "-"

    for s in (comp.a, comp.b):
        console.print(
            f"[bold]{s.role}[/] = {escape(s.path or '')} ({s.version}, {s.adapter})"
            + (" [yellow]stale: the document changed since[/]" if s.stale else ""),
            highlight=False,
        )
    # Eleven columns must fit an 80-column CI log: a light box, short headers, the paths above.
    table = Table(
        title=f"scored on A's {comp.heldout_examples} held-out examples ({comp.heldout_tokens} tokens); "
        "* = the side the verdict keeps",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    f1 = any(s.answer_f1 is not None for s in comp.sides)  # a column only when a learning report has it
    # exact match is in the JSON only: a twelfth column would not fit 80 columns
    pref = any(s.pref_accuracy is not None for s in comp.sides)  # objective dpo: preference figures
    cols = ("side", "loss", "ppl", "delta_kl", *(("F1",) if f1 else ()), *(("pref acc", "margin") if pref else ()))
    cols = (*cols, "s/step", "train", "peak mem")
    for col in (*cols, "trainable", "size"):
        table.add_column(col, justify="left" if col == "side" else "right", no_wrap=True)
    for s in comp.sides:
        ppl = num(s.perplexity, ".2f" if (s.perplexity or 0) < 1000 else ".0f")
        table.add_row(
            f"[bold]{s.role}[/]" + (" *" if s.role == v.keep else ""),
            num(s.eval_loss, ".4f"),
            ppl,
            num(s.delta_kl, ".3g"),
            *((num(s.answer_f1, ".2f"),) if f1 else ()),
            *((num(s.pref_accuracy, ".2f"), num(s.reward_margin, "+.3f")) if pref else ()),
            num(s.steady_step_seconds, ".3f"),
            duration(s.train_seconds) if s.train_seconds is not None else "-",
            gib(s.peak_memory_bytes) if s.peak_memory_bytes else "-",
            _count(s.trainable_params),
            _size(s.adapter_bytes),
        )
    console.print(table)
    ratios = [
        ("step time", v.step_time_ratio),
        ("peak memory", v.memory_ratio),
        ("train time", v.train_time_ratio),
        ("trainable params", v.params_ratio),
        ("adapter bytes", v.adapter_bytes_ratio),
    ]
    console.print("B / A: " + ", ".join(f"{label} x{num(r, '.2f')}" for label, r in ratios), highlight=False)
    if v.gain_low is not None and v.gain_high is not None:
        console.print(
            f"gain on {v.metric}: {pct(v.gain)}, {v.level:.0%} interval {pct(v.gain_low)} to {pct(v.gain_high)} "
            f"(paired bootstrap, {v.resamples} resamples of {v.examples} examples); min gain {v.min_gain:.1%}",
            highlight=False,
        )
    if comp.differences:
        diff = Table(
            title="configuration differences (dlm_id aside)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False
        )
        for col in ("key", "A", "B", "from"):
            diff.add_column(col, overflow="fold")
        for d in comp.differences:
            diff.add_row(
                escape(d.key), escape(json.dumps(d.a, default=str)), escape(json.dumps(d.b, default=str)), d.source
            )
        console.print(diff)
    else:
        console.print("configuration differences: none (dlm_id aside)", highlight=False)
    for note in comp.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    style = {"B pays": "bold green", "keep A": "bold", "inconclusive": "bold yellow"}.get(v.outcome, "bold")
    console.print(f"[{style}]verdict:[/] {escape(v.reason)}", highlight=False, soft_wrap=True)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n:,}" if n < 100_000 else f"{n / 1e6:.2f}M"


# --- answers -------------------------------------------------------------------------------------


def answers(console: Console, rows: list[dict[str, str]], sides: tuple[str, ...]) -> None:
    """`dlm prompt`: a single answer alone (as a script wants it); otherwise each question with its
    answers under it, labelled by side when there are two. Answers print verbatim (no markup)."""
    if len(rows) == 1 and len(sides) == 1:
        console.print(Text(rows[0][sides[0]]), highlight=False, soft_wrap=True)
        return
    for i, row in enumerate(rows):
        if i:
            console.print()
        console.print(Text("> " + row["question"], style="bold"), highlight=False, soft_wrap=True)
        for side in sides:
            label = (f"{side}: ", "dim") if len(sides) > 1 else ""
            console.print(Text.assemble(label, row[side]), highlight=False, soft_wrap=True)


def chat_turn(out: Console, err: Console, turn: Any) -> None:
    """`dlm chat`: an answer on stdout, verbatim; a command's note, or an unknown command, on stderr."""
    if turn.kind == "answer":
        out.print(Text(turn.text), highlight=False, soft_wrap=True)
    elif turn.kind == "note":
        err.print(Text(turn.text, style="dim"), highlight=False, soft_wrap=True)
    elif turn.kind == "unknown":
        err.print(Text(turn.text, style="yellow"), highlight=False, soft_wrap=True)
