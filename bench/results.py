"""The bench's results as figures: variants, targets, lookups and `summarise` (ratios, spans,
the DoRA/LoRA and ablation tables, which targets were met). Pure; no runs, no files."""

from __future__ import annotations

import math
from typing import Any

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


def _f(x: Any, fmt: str = ".2f", pre: str = "") -> str:
    return "-" if not isinstance(x, (int, float)) or not math.isfinite(x) else f"{pre}{x:{fmt}}"
