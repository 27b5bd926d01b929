"""`make bench` (bench/bench.py): dlm against a plain TRL script, in one run, on one machine.

For each variant (LoRA and DoRA, lora_dropout 0 and 0.05) three runs of the same document, each in
its own process (`bench/worker.py`, so imports and peak RSS are its own): `plain` (the script the
TRL docs show, TRL's defaults), `same` (dlm's training path forced to the plain script's knobs) and
`dlm` (the plan `dlm train` uses). The runs of a variant go back to back, so slow drift from other
jobs on the machine hits the three alike. Out come ratios (dlm vs plain, DoRA vs LoRA, forecasts vs
reality, estimates vs measurements), a Markdown report and a PNG chart. Owns the orchestration
(figures in `bench/results.py`, the report in `bench/report.py`); measures nothing itself. Heavy libraries only in the workers.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import report
from bench.results import ABLATIONS, KINDS, REPEAT_STEPS, VARIANTS, _f, variant_name

WORKER = Path(__file__).with_name("worker.py")


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
