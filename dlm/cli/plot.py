"""The `dlm compare --plot FILE.png` figure: one PNG that answers "did B pay?" at a glance.

Four panels: both runs' training-loss curves (held-out loss points where the run evaluated), the
held-out loss of base / A / B, delta_kl of A and B, and B's cost relative to A (ratios, 1 = same).
The title is the verdict line. Owns nothing but drawing a `verdict.Comparison`; matplotlib (Agg,
no display needed) is imported inside the function so the CLI stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLORS = {"base": "#9e9e9e", "A": "#1f77b4", "B": "#d62728"}


def _label(side: Any) -> str:
    return f"{side.role}: {side.adapter}" if side.adapter else side.role


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.nan


def comparison_png(comp: Any, path: str | Path) -> Path:
    """Draw `comp` into a PNG at `path` (parent folders created) and return the path."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, works on a headless CI machine
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (curves, losses), (kls, costs) = axes
    v = comp.verdict

    for side in (comp.a, comp.b):
        pts = [(e["step"], e["loss"]) for e in side.log if isinstance(e.get("loss"), (int, float))]
        if pts:
            curves.plot(*zip(*pts), color=COLORS[side.role], label=f"{_label(side)} train loss")
        evals = [(e["step"], e["eval_loss"]) for e in side.log if isinstance(e.get("eval_loss"), (int, float))]
        if evals:
            curves.plot(*zip(*evals), "o--", color=COLORS[side.role], alpha=0.7, label=f"{side.role} eval loss")
    curves.set(title="training loss by optimizer step", xlabel="step", ylabel="loss")
    if curves.lines:
        curves.legend(fontsize=8)
    else:
        curves.text(0.5, 0.5, "no log.jsonl entries", ha="center", va="center", transform=curves.transAxes)

    def bars(ax: Any, sides: tuple[Any, ...], values: list[float], title: str, fmt: str) -> None:
        names = [_label(s) for s in sides]
        drawn = ax.bar(names, [0 if math.isnan(x) else x for x in values], color=[COLORS[s.role] for s in sides])
        ax.bar_label(drawn, labels=["-" if math.isnan(x) else format(x, fmt) for x in values], fontsize=9)
        ax.set_title(title)
        ax.margins(y=0.15)

    # Bars start at 0 (honest heights); close values are told apart by the labels and B's gain in the title.
    def gain_of(metric: str) -> str:
        from dlm.use.verdict import relative_gain

        g = relative_gain(metric, getattr(comp.a, metric), getattr(comp.b, metric))
        return "B vs A: -" if g is None else f"B vs A: {g:+.2%}" if math.isfinite(g) else f"B vs A: {g:+}"

    bars(
        losses,
        comp.sides,
        [_num(s.eval_loss) for s in comp.sides],
        f"held-out loss on {comp.heldout_tokens} tokens, lower is better\n{gain_of('eval_loss')}",
        ".4f",
    )
    bars(
        kls,
        (comp.a, comp.b),
        [_num(s.delta_kl) for s in (comp.a, comp.b)],
        f"delta_kl = KL(adapted || base), nats/token, higher = moved further\n{gain_of('delta_kl')}",
        ".3g",
    )

    labels = ["step time", "peak memory", "train time", "trainable params", "adapter bytes"]
    ratios = [
        _num(r) for r in (v.step_time_ratio, v.memory_ratio, v.train_time_ratio, v.params_ratio, v.adapter_bytes_ratio)
    ]
    drawn = costs.barh(
        labels,
        [0 if math.isnan(r) else r for r in ratios],
        color=[COLORS["B"] if r > 1.005 else COLORS["A"] if r < 0.995 else COLORS["base"] for r in ratios],
    )  # red: B costs more, blue: less, grey: the same
    costs.bar_label(drawn, labels=["-" if math.isnan(r) else f"x{r:.2f}" for r in ratios], fontsize=9, padding=3)
    costs.axvline(1.0, color="black", linewidth=1)
    costs.set(title="B's cost relative to A (1 = the same)", xlabel="B / A")
    costs.invert_yaxis()
    costs.margins(x=0.2)

    verdict = "B pays" if v.b_pays else "keep A"
    fig.suptitle(
        f"dlm compare, metric {v.metric}, min gain {v.min_gain:.1%}: {verdict}\n{v.reason}", fontsize=10, wrap=True
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # leave the top for the two-line title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
