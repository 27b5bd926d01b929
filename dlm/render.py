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
    console.print(
        f"corpus: {corpus.n_train} training / {corpus.n_heldout} held-out examples "
        f"({corpus.n_prose} prose, {corpus.n_instruction} instruction), ~{corpus.train_tokens} tokens",
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
    console.print(escape(kwargs_call("from_pretrained", plan.model_kwargs)), highlight=False, soft_wrap=True)
    est = plan.estimates
    label = "measured" if est.measured else "estimated"
    console.print(
        f"{label}: {est.optimizer_steps} optimizer steps x {est.tokens_per_step} tokens, "
        f"peak memory {gib(est.peak_memory_bytes)}, {est.step_seconds:.2f} s/step, "
        f"total {duration(est.total_seconds)}",
        highlight=False,
    )
    findings(console, plan.findings)
    console.print(escape(plan.reason), style="bold", highlight=False, soft_wrap=True)


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


def as_json(console: Console, data: Any) -> None:
    """Stable JSON: sorted keys, two-space indent, no rich markup."""
    console.file.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def panel(console: Console, title: str, body: str) -> None:
    console.print(Panel(escape(body), title=title, expand=False))
