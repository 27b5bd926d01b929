"""`make bench` (bench/bench.py): dlm against a plain TRL script, in one run, on one machine.

For each variant (LoRA and DoRA, lora_dropout 0 and 0.05) three runs of the same document, each in
its own process (`bench/worker.py`, so imports and peak RSS are its own): `plain` (the script the
TRL docs show, TRL's defaults), `same` (dlm's training path forced to the plain script's knobs) and
`dlm` (the plan `dlm train` uses). The runs of a variant go back to back, so slow drift from other
jobs on the machine hits the three alike. Out come ratios (dlm vs plain, DoRA vs LoRA, forecasts vs
reality, estimates vs measurements), a Markdown report and a PNG chart. Owns the orchestration and
the report; measures nothing itself. Heavy libraries only in the workers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("worker.py")
VARIANTS = (("lora", 0.0), ("lora", 0.05), ("dora", 0.0), ("dora", 0.05))
KINDS = ("plain", "same", "dlm")
TARGETS = {"same": 0.03, "speedup": 1.25, "dora_lora": 1.10, "eta": 0.10, "memory": 0.25}
# One planner decision at a time, undone on the plan's own LoRA d=0 run: kind -> what that run changes
ABLATIONS = {
    "packed": "`packing: true` (the plan: off)",
    "malloc-off": "glibc's default allocator (the plan: `cpu_allocator: keep-freed`)",
    "ckpt-on": "activation checkpointing on (the plan: off; TRL's default: on)",
}
REPEAT_STEPS = 12  # the second plain and same runs of a variant (A B B A order)
DEFAULT_STEPS = 32  # per run: 24 runs in ~25 min on 2 CPU cores; 10% of the run is step 4 (3 warm-up)


def variant_name(adapter: str, dropout: float) -> str:
    return f"{'LoRA' if adapter == 'lora' else 'DoRA'} d={dropout:g}"


def run_one(cfg: dict[str, Any], log_dir: Path, timeout: float = 1800) -> dict[str, Any]:
    """One worker process; its result dict, or {"error": ...} with the log's tail."""
    name = f"{cfg['kind']}-{cfg['adapter']}-{cfg['dropout']:g}" + (f"-r{cfg['repeat']}" if cfg.get("repeat") else "")
    log = log_dir / f"{name}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(WORKER), json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=fh,
            text=True,
            env=env,
            timeout=timeout,
        )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"config": cfg, "error": f"exit {proc.returncode}: " + "\n".join(tail)}


def run_all(
    file: Path,
    home: Path,
    steps: int,
    log_dir: Path,
    *,
    variants=VARIANTS,
    kinds=KINDS,
    ablations: tuple[str, ...] = tuple(ABLATIONS),
    repeats: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict[str, Any]]:
    """Every run, in order. Per variant: plain, same, [same, plain again with REPEAT_STEPS: the A B B A
    order cancels a drift of the machine's speed out of the same-knobs ratio, and each kind has one
    run of each length, so both means cover the same batches], dlm. Then the ablations on LoRA d=0
    and, closing them, the plan's own LoRA d=0 run once more (the ablations are compared with the
    mean of its two runs)."""
    results: list[dict[str, Any]] = []

    def go(kind: str, adapter: str, dropout: float, n: int, repeat: int = 0) -> None:
        cfg = {"kind": kind, "file": str(file), "adapter": adapter, "dropout": dropout, "steps": n, "home": str(home)}
        if repeat:
            cfg["repeat"] = repeat
        results.append(run_one(cfg, log_dir))
        if on_result is not None:
            on_result(results[-1])

    short = min(steps, REPEAT_STEPS)
    ready = run_one(
        {"kind": "prepare", "file": str(file), "adapter": "lora", "dropout": 0.0, "steps": steps, "home": str(home)},
        log_dir,
    )
    if "error" in ready:  # no base, no run: report it once rather than once per run
        if on_result is not None:
            on_result(ready)
        return [ready]
    for adapter, dropout in variants:
        for kind in kinds:
            go(kind, adapter, dropout, steps)
            if kind == "same" and repeats and "plain" in kinds:
                go("same", adapter, dropout, short, 1)
                go("plain", adapter, dropout, short, 1)
    for kind in ablations:  # what each decision earns on this document, beside the plan's own LoRA d=0 run
        go(kind, "lora", 0.0, steps)
    if ablations and repeats and "dlm" in kinds:  # full length: the ablations are compared over the same steps
        go("dlm", "lora", 0.0, steps, 1)
    return results


# --- ratios --------------------------------------------------------------------------------------


def _get(results: list[dict], kind: str, adapter: str, dropout: float, repeat: int = 0) -> dict | None:
    for r in _all(results, kind, adapter, dropout):
        if r["config"].get("repeat", 0) == repeat:
            return r
    return None


def _all(results: list[dict], kind: str, adapter: str, dropout: float) -> list[dict]:
    return [
        r
        for r in results
        if "error" not in r
        and (r["config"]["kind"], r["config"]["adapter"], r["config"]["dropout"]) == (kind, adapter, dropout)
    ]


def _mean_tps(runs: list[dict]) -> float | None:
    values = [_tps(r) for r in runs if _tps(r)]
    return sum(values) / len(values) if values else None


def _div(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def summarise(results: list[dict]) -> dict[str, Any]:
    """Every ratio the report prints, and each target as met / not met / unknown (None)."""
    rows, checks = [], {k: [] for k in TARGETS}
    for adapter, dropout in VARIANTS:
        plain, same, dlm = (_get(results, k, adapter, dropout) for k in KINDS)
        row = {
            "variant": variant_name(adapter, dropout),
            "adapter": adapter,
            "dropout": dropout,
            "plain": plain,
            "same": same,
            "dlm": dlm,
            # time per token, same / plain, from the mean tokens/s of each kind's runs (A B B A)
            "same_vs_plain": _div(
                _mean_tps(_all(results, "plain", adapter, dropout)), _mean_tps(_all(results, "same", adapter, dropout))
            ),
            "same_runs": len(_all(results, "same", adapter, dropout)),
            "speedup": _div(_tps(dlm), _tps(plain)),
            "loss_plain": plain and plain.get("eval_loss"),
            "loss_dlm": dlm and dlm.get("eval_loss"),
        }
        rows.append(row)
        if row["same_vs_plain"] is not None:
            checks["same"].append(abs(row["same_vs_plain"] - 1) <= TARGETS["same"])
        if row["speedup"] is not None and row["loss_plain"] is not None and row["loss_dlm"] is not None:
            checks["speedup"].append(
                row["speedup"] >= TARGETS["speedup"] and row["loss_dlm"] <= row["loss_plain"] * 1.01
            )
        for r in (dlm,):
            if r and r.get("eta_dlm_total_s"):
                checks["eta"].append(abs(r["eta_dlm_total_s"] / r["real_total_s"] - 1) <= TARGETS["eta"])
            if r and r.get("est_peak_bytes"):
                checks["memory"].append(abs(r["est_peak_bytes"] / r["peak_bytes"] - 1) <= TARGETS["memory"])
    dora = []
    for dropout in (0.0, 0.05):
        for kind in ("plain", "dlm"):
            lora_r, dora_r = _get(results, kind, "lora", dropout), _get(results, kind, "dora", dropout)
            ratio = _div(_tps(lora_r), _tps(dora_r))
            dora.append({"kind": kind, "dropout": dropout, "ratio": ratio})
            if kind == "dlm" and ratio is not None:
                checks["dora_lora"].append(ratio <= TARGETS["dora_lora"])
    met = {k: (all(v) if v else None) for k, v in checks.items()}
    detail = _details(rows, dora)
    plan_runs = _all(results, "dlm", "lora", 0.0)
    plan_run, plan_tps = (plan_runs[0] if plan_runs else None), _mean_tps(plan_runs)
    ablations = [
        {
            "kind": kind,
            "label": label,
            "run": _get(results, kind, "lora", 0.0),
            "plan": plan_run,
            "plan_tps": plan_tps,
            "plan_runs": len(plan_runs),
            "plan_gain": _div(plan_tps, _tps(_get(results, kind, "lora", 0.0))),
        }
        for kind, label in ABLATIONS.items()
        if _get(results, kind, "lora", 0.0)
    ]
    return {"rows": rows, "dora_lora": dora, "met": met, "checks": checks, "ablations": ablations, "detail": detail}


def _span(values: list[float], fmt: str, pre: str = "x") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{pre}{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{pre}{lo:{fmt}} to {pre}{hi:{fmt}}"


def _details(rows: list[dict], dora: list[dict]) -> dict[str, str]:
    """The measured value behind each target, in words."""

    def loss_gap(kind: str) -> list[float]:
        return [
            (r[kind]["eval_loss"] / r["plain"]["eval_loss"] - 1) * 100
            for r in rows
            if r[kind] and r["plain"] and r[kind].get("eval_loss") and r["plain"].get("eval_loss")
        ]

    dlms = [r["dlm"] for r in rows if r["dlm"]]
    return {
        "same": "time per token " + _span([r["same_vs_plain"] for r in rows], ".3f"),
        "speedup": (
            f"tokens/s {_span([r['speedup'] for r in rows], '.2f')}; held-out loss vs plain "
            f"{_span(loss_gap('dlm'), '+.2f', '')}% (the same-knob runs: {_span(loss_gap('same'), '+.2f', '')}%)"
        ),
        "dora_lora": ", ".join(
            f"dropout {x['dropout']:g}: {_f(x['ratio'], '.3f', 'x')}" for x in dora if x["kind"] == "dlm"
        ),
        "eta": "projected / real " + _span([_div(d.get("eta_dlm_total_s"), d["real_total_s"]) for d in dlms], ".2f"),
        "memory": "estimate / peak RSS " + _span([_div(d.get("est_peak_bytes"), d["peak_bytes"]) for d in dlms], ".2f"),
        "time": "measured / estimated s/step " + _span([_div(d["steady_s"], d.get("est_step_s")) for d in dlms], ".2f"),
    }


def _tps(r: dict | None) -> float | None:
    return r.get("tokens_per_s") if r else None


# --- report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    from dlm.plan.hardware import package_versions, probe_light

    hw = probe_light()
    model = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else ""
    )
    return {
        "device": hw.device,
        "name": model or hw.name,
        "cores": hw.cores,
        "memory_gib": round(hw.memory_bytes / 2**30, 1),
        "native_bf16": hw.native_bf16,
        "python": platform.python_version(),
        "packages": package_versions(),
    }


def _f(x: Any, fmt: str = ".2f", pre: str = "") -> str:
    return "-" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{pre}{x:{fmt}}"


def _yes(v: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[v]


def markdown(results: list[dict], summary: dict, info: dict[str, Any]) -> str:
    m, rows = info["machine"], summary["rows"]
    out = [
        f"# Performance: dlm vs a plain TRL script ({info['file']})",
        "",
        f"Generated by `{info['command']}` on {info['date']}; every figure below is the one that run printed.",
        f"{info['steps']} optimizer steps per run ({min(info['steps'], REPEAT_STEPS)} for the repeats), "
        f"{len(results)} runs, {info['minutes']:.1f} min in all. "
        f"Load average (1 min) {info['load_before']:.1f} before the first run (the bench's own runs keep it "
        f"near {m['cores']} while they train)"
        + (
            ": other jobs shared the CPU, so absolute times are noisy; the ratios compare runs made minutes apart."
            if info["load_before"] > 0.5 * m["cores"]
            else "."
        ),
        "",
        "## Machine",
        "",
        f"{m['device']} {m['name']}, {m['cores']} cores, {m['memory_gib']} GiB, native bf16: {m['native_bf16']}; "
        f"Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        "",
        "## Speed (tokens/s over the steps after 2 warm-up steps; s/step is the median)",
        "",
        "| variant | plain s/step | plain tok/s | same tok/s | same vs plain (time/token, A B B A mean) | dlm s/step | dlm tok/s "
        "| dlm / plain tok/s | held-out loss plain / dlm | peak RSS plain / dlm (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, s, d = r["plain"] or {}, r["same"] or {}, r["dlm"] or {}
        out.append(
            f"| {r['variant']} | {_f(p.get('steady_s'))} | {_f(p.get('tokens_per_s'), '.0f')} | "
            f"{_f(s.get('tokens_per_s'), '.0f')} | {_f(r['same_vs_plain'], '.3f', 'x')} | {_f(d.get('steady_s'))} | "
            f"{_f(d.get('tokens_per_s'), '.0f')} | {_f(r['speedup'], '.2f', 'x')} | "
            f"{_f(r['loss_plain'], '.4f')} / {_f(r['loss_dlm'], '.4f')} | "
            f"{_f((p.get('peak_bytes') or 0) / 2**30)} / {_f((d.get('peak_bytes') or 0) / 2**30)} |"
        )
    out += ["", "What dlm's plan chose (the `dlm` column):", ""]
    for r in rows:
        d = r["dlm"] or {}
        if d:
            out.append(
                f"- {r['variant']}: micro {d['micro']} x accum {d['accum']}, checkpointing "
                f"{d['checkpointing']}, bf16 {d['bf16']}, packing {d.get('packing')}, runtime {d.get('runtime') or {}}; "
                f"`{d.get('reason', '')}`"
            )
    if summary["ablations"]:
        out += [
            "",
            "## The plan's decisions one at a time (LoRA d=0)",
            "",
            "Each run is dlm's own plan with one decision undone; *plan / this* > 1 means the decision earns "
            "speed. *plan tok/s* is the mean of the plan's two LoRA d=0 runs (one before the ablations, one "
            "after them). A packed step holds more rows, so its held-out loss after the same steps is not "
            "comparable.",
            "",
            "| run | tok/s | plan tok/s | plan / this (tok/s) | peak RSS this / plan (GiB) | held-out loss this / plan |",
            "|---|---|---|---|---|---|",
        ]
        for a in summary["ablations"]:
            r, pl = a["run"], a["plan"] or {}
            out.append(
                f"| {a['label']} | {_f(_tps(r), '.0f')} | {_f(a['plan_tps'], '.0f')} | {_f(a['plan_gain'], '.3f', 'x')} | "
                f"{_f(r['peak_bytes'] / 2**30)} / {_f((pl.get('peak_bytes') or 0) / 2**30)} | "
                f"{_f(r.get('eval_loss'), '.4f')} / {_f(pl.get('eval_loss'), '.4f')} |"
            )
    out += ["", "## DoRA / LoRA (time per token)", "", "| dropout | plain (TRL defaults) | dlm plan |", "|---|---|---|"]
    for dropout in (0.0, 0.05):
        by = {x["kind"]: x["ratio"] for x in summary["dora_lora"] if x["dropout"] == dropout}
        out.append(f"| {dropout:g} | {_f(by.get('plain'), '.3f', 'x')} | {_f(by.get('dlm'), '.3f', 'x')} |")
    out += [
        "",
        "## ETA shown at 10% of the run vs the real training time",
        "",
        "Projected total = elapsed + ETA at step ceil(0.1 x steps). *cumulative*: elapsed / steps done x steps "
        "left (the HF Trainer's tqdm bar); *dlm*: `progress.EtaEstimator` (mean of the steps after 3 warm-up steps, stalls and pauses left out).",
        "",
        "| run | real total s | cumulative at 10% | dlm at 10% |",
        "|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            continue
        c = r["config"]
        real = r["real_total_s"]
        if c.get("repeat"):  # the short repeats: too few steps for a forecast at 10%
            continue
        out.append(
            f"| {c['kind']} {variant_name(c['adapter'], c['dropout'])} | {real:.1f} | "
            f"{_f(_div(r.get('eta_hf_total_s'), real), '.2f', 'x')} | {_f(_div(r.get('eta_dlm_total_s'), real), '.2f', 'x')} |"
        )
    out += [
        "",
        "## The planner's estimates vs the `dlm` runs",
        "",
        "| variant | est s/step | measured s/step (median) | est total s | real total s | est peak GiB | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["dlm"] or {}
        if d:
            out.append(
                f"| {r['variant']} | {_f(d['est_step_s'])} | {_f(d['steady_s'])} | {_f(d['est_total_s'], '.0f')} | "
                f"{_f(d['real_total_s'], '.0f')} | {_f(d['est_peak_bytes'] / 2**30)} | {_f(d['peak_bytes'] / 2**30)} |"
            )
    out += [
        "",
        f"Time estimates: {summary['detail']['time']}. docs/estimates.md says which machine each CPU time "
        "constant was fitted on; `dlm doctor FILE --probe N` replaces the estimates with measurements on the "
        "machine at hand.",
    ]
    met, det = summary["met"], summary["detail"]
    out += [
        "",
        "## Targets (issue 5)",
        "",
        "| target | measured | result |",
        "|---|---|---|",
        f"| dlm with the plain script's knobs within 3% of its time per token | {det['same']} | {_yes(met['same'])} |",
        f"| dlm's plan >= 1.25x the plain script's tokens/s, held-out loss no worse (checked within 1%) | "
        f"{det['speedup']} | {_yes(met['speedup'])} |",
        f"| DoRA / LoRA <= 1.10 under dlm's plan, dropout 0 and 0.05 | {det['dora_lora']} | {_yes(met['dora_lora'])} |",
        f"| dlm's ETA at 10% within 10% of the real total | {det['eta']} | {_yes(met['eta'])} |",
        f"| memory estimate within 25% of the measured peak RSS | {det['memory']} | {_yes(met['memory'])} |",
    ]
    if m["device"] == "cpu":
        out += [
            "",
            "## GPU",
            "",
            "Not measured in this report: it ran on a CPU. Run `make bench` on a CUDA machine "
            "for its table (tokens/s and the planner's decisions there: fused AdamW, sdpa, bf16 or fp16 by compute "
            "capability); until then those decisions rest on the reasons the doctor prints, not on a measurement.",
        ]
    errors = [r for r in results if "error" in r]
    if errors:
        out += ["", "## Failed runs", ""] + [
            f"- {r['config']['kind']} {r['config']['adapter']} {r['config']['dropout']}: `{r['error'][:300]}`"
            for r in errors
        ]
    out += [
        "",
        "## Method",
        "",
        METHOD.format(steps=info["steps"], repeat=min(info["steps"], REPEAT_STEPS)),
        "",
        "![chart](performance.png)",
        "",
    ]
    return "\n".join(out)


METHOD = """\
- Each run is its own process (`bench/worker.py`), so imports, loading and peak RSS are
  its own. A variant's runs go back to back in the order plain, same, same, plain, dlm: the second
  same and plain runs have {repeat} steps, and the same-vs-plain ratio compares the mean tokens/s of
  each kind's two runs, so a drift of the machine's speed during the four runs cancels out (runs
  minutes apart on this shared 2-core machine differ by up to ~10% with identical knobs). The
  variants follow one another; then the ablations, then the plan's LoRA d=0 run once more.
- `plain`: `SFTTrainer(model=<base folder>, train_dataset=<rows>, args=SFTConfig(...),
  peft_config=LoraConfig(...))` as the TRL documentation writes it. Set to match dlm's run: the
  document's rows (rendered by dlm, the same for all runs), `r`, `lora_alpha`, `lora_dropout`,
  `target_modules`, `use_dora`, learning rate, seed, `max_length`, micro batch, accumulation, and
  `use_cpu` on a CPU. Everything else is TRL's default: activation checkpointing on, fp32 weights,
  bf16 autocast (kept on where the hardware has fast bf16, switched off elsewhere, where it would be
  ~14x slower), PEFT's DoRA dropout, no evaluation during training.
- `same`: `dlm.train.run` with the plan forced to those knobs (checkpointing on, fp32 weights with the
  same autocast, TRL's default optimizer, `dora_dropout: input`, no packing, no evaluation or
  checkpoints in the loop). It measures dlm's own overhead: callbacks, logging every step, the row
  format.
- `dlm`: `dlm.train.run` with the plan `dlm train` makes for the document (with `max_steps` {steps}); for DoRA
  with dropout > 0 the document also sets `dora_dropout: branch`, the option the doctor's
  `dora-with-dropout` finding suggests (the default is PEFT's form, `input`).
- Time: a TrainerCallback stamps each optimizer step's start and end and the pauses after it
  (evaluation, checkpoints). tokens/s = non-padding tokens (TRL's `num_tokens`) over the compute time
  of the steps after the first two; s/step is the median of those steps. Steps differ in length
  (each batch pads to its longest row), so compare tokens/s, not single steps.
- Memory: `dlm.train.peak_memory` for every run: the worker's peak RSS (`ru_maxrss`, loading
  included) on a CPU, `max_memory_allocated` on CUDA.
- ETA: both forecasts are replayed from the same timeline at step ceil(0.1 x steps) and compared with
  the real time from the start to the end of the training loop (evaluations and saves included).
- Held-out loss: `dlm.train.evaluate.eval_loss` on the document's held-out examples after the last step, the
  same function for every run.
"""


def chart(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, (speed, dora) = plt.subplots(1, 2, figsize=(12, 4.5))
    width, colors = 0.27, {"plain": "#9e9e9e", "same": "#1f77b4", "dlm": "#2ca02c"}
    for i, kind in enumerate(KINDS):
        values = [(_tps(r[kind]) or 0) for r in rows]
        bars = speed.bar([x + (i - 1) * width for x in range(len(rows))], values, width, label=kind, color=colors[kind])
        speed.bar_label(bars, labels=[f"{v:.0f}" if v else "-" for v in values], fontsize=7)
    speed.set_xticks(range(len(rows)), [r["variant"] for r in rows])
    speed.set(title="tokens/s (higher is better)", ylabel="tokens/s")
    speed.legend(fontsize=8)
    labels = [f"{x['kind']} d={x['dropout']:g}" for x in summary["dora_lora"]]
    values = [x["ratio"] or 0 for x in summary["dora_lora"]]
    bars = dora.bar(labels, values, color=[colors[x["kind"]] for x in summary["dora_lora"]])
    dora.bar_label(bars, labels=[f"x{v:.2f}" if v else "-" for v in values], fontsize=8)
    dora.axhline(1.10, color="red", linestyle="--", linewidth=1, label="target 1.10")
    dora.axhline(1.0, color="black", linewidth=0.8)
    dora.set(title="DoRA / LoRA time per token (lower is better)", ylim=(0.8, max([1.5, *values]) + 0.1))
    dora.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(results: list[dict], info: dict[str, Any], md: Path | None, png: Path | None) -> dict[str, Any]:
    """Summary, Markdown and chart from finished runs (also: re-render a saved results.json)."""
    summary = summarise(results)
    text = markdown(results, summary, info)
    if md is not None:
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text)
    if png is not None:
        chart(summary, png)
    return {"results": results, "summary": summary, "markdown": text, "info": info}


def run(
    file: Path,
    home: Path,
    *,
    steps: int,
    md: Path | None,
    png: Path | None,
    log_dir: Path,
    command: str,
    on_line: Callable[[str], None] = print,
    label: str | None = None,
) -> dict[str, Any]:
    """The whole bench: runs, summary, report files. Returns {"results", "summary", "markdown"}."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), os.getloadavg()[0]

    def on_result(r: dict) -> None:
        c = r["config"]
        head = f"{c['kind']:10s} {variant_name(c['adapter'], c['dropout']):10s}" + (
            " (repeat)" if c.get("repeat") else ""
        )
        on_line(
            f"{head} FAILED {r['error'][:200]}"
            if "error" in r
            else f"{head} {r['steady_s']:.2f} s/step, {r['tokens_per_s']:.0f} tok/s, peak {r['peak_bytes'] / 2**30:.2f} GiB, "
            f"held-out loss {_f(r.get('eval_loss'), '.4f')} ({r['wall_s']:.0f} s)"
        )

    results = run_all(file, home, steps, log_dir, on_result=on_result)
    info = {
        "file": label or str(file),
        "steps": steps,
        "command": command,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.time() - t0) / 60,
        "load_before": load0,
        "load_after": os.getloadavg()[0],
    }
    (log_dir / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=1, default=str))
    return report(results, info, md, png)


def ratio_table(summary: dict) -> str:
    """The console summary: one line per variant, then the DoRA/LoRA ratios and the targets."""
    lines = [f"{'variant':10s}  {'same/plain':>10s}  {'dlm/plain tok/s':>15s}  {'loss plain/dlm':>15s}"]
    for r in summary["rows"]:
        lines.append(
            f"{r['variant']:10s}  {_f(r['same_vs_plain'], '.3f', 'x'):>10s}  {_f(r['speedup'], '.2f', 'x'):>15s}  "
            f"{_f(r['loss_plain'], '.3f')}/{_f(r['loss_dlm'], '.3f')}"
        )
    for x in summary["dora_lora"]:
        lines.append(f"DoRA/LoRA {x['kind']:5s} dropout {x['dropout']:g}: {_f(x['ratio'], '.3f', 'x')}")
    for a in summary["ablations"]:
        lines.append(f"plan vs {a['kind']} (LoRA d=0): {_f(a['plan_gain'], '.3f', 'x')} tokens/s")
    lines += [
        f"target {k}: {'met' if v else 'not met' if v is False else 'not measured'}" for k, v in summary["met"].items()
    ]
    return "\n".join(lines)
