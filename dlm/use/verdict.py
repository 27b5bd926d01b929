"""The judgement of `dlm compare`: is twin B worth what it costs over A? Pure: no I/O, no torch.

Owns the comparison's data types (`Side`, `Difference`, `Verdict`, `Comparison`), the config diff
between two trained versions, the verdict rule, perplexity and the stable JSON shape
(`SCHEMA_VERSION`). `compare.py` reads the versions and has them scored; rendering lives in
`render.comparison`, the PNG in `plot.py`. docs/compare.md is the user-facing account of every
definition below.

The verdict rule, in one place:
- A is the baseline (by convention the cheaper side, e.g. LoRA), B the candidate (e.g. DoRA).
- gain = B's improvement on the metric relative to A's value: (A - B) / A for eval_loss (lower is
  better), (B - A) / A for delta_kl (higher is better: the adapter moved the model further from the
  base on the document's own answers) and for answer_f1 (higher is better: the learning report's
  held-out answer F1, read from each version's metrics.json). When A's value is 0 the gain is 0 for a tie and +-inf
  otherwise (JSON: null, with `b_pays` still decided).
- The uncertainty: a paired bootstrap over A's held-out examples. Each of RESAMPLES resamples draws
  as many examples as there are, with replacement (examples, never tokens: one example's tokens move
  together), and recomputes the gain from the same examples for A and B; the INTERVAL_LEVEL
  percentile interval of those gains is the gain's confidence interval. The random draw is seeded
  (BOOTSTRAP_SEED), so one report always gives one interval.
- Three outcomes: `B pays` when the whole interval is at or above min_gain; `keep A` when it lies
  wholly below; `inconclusive` when it straddles min_gain, or when there are no per-example figures
  to resample (then there is no interval). A missing metric is `keep A`. `b_pays` is true only for
  `B pays`, and `keep` is "B" only then. A negative min_gain is a tolerance: B is kept even if it is
  worse by up to that fraction. B's cost is stated either way as ratios B / A of steady step time,
  peak memory, training time, trainable parameters and adapter bytes, and as gain per extra second
  of training.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dlm.errors import DlmError

# The `dlm_compare` field of to_json(); bumped only when a field changes meaning. 2: `b_pays`/`keep`
# follow the bootstrap interval (`outcome`), not the point gain alone.
SCHEMA_VERSION = 2
BETTER = {"eval_loss": "lower", "delta_kl": "higher", "answer_f1": "higher", "exact_match": "higher"}
OUTCOMES = ("B pays", "keep A", "inconclusive")
RESAMPLES = 2000  # bootstrap resamples: the interval's ends move by well under 0.1% of a gain between seeds
INTERVAL_LEVEL = 0.95
BOOTSTRAP_SEED = 0
Z = 1.959964  # the normal quantile of a two-sided 95% interval, for the examples-needed estimate
# objective dpo (docs/preference.md): held-out preference accuracy and mean reward margin, from metrics.json
BETTER.update(pref_accuracy="higher", reward_margin="higher")
MIN_GAIN_RANGE = (-1.0, 1.0)
EPS = 1e-12  # "at least min_gain" must survive float rounding of (A - B) / A
# Keys that differ between twins by construction: each side's identity, not a confound.
IDENTITY_KEYS = frozenset({"dlm_id"})
# Hardware fields that change where cost numbers come from; a difference there is a confound.
HARDWARE_KEYS = (
    "device",
    "name",
    "memory_bytes",
    "cores",
    "compute_capability",
    "device_count",
    "native_bf16",
    "torch_version",
)


@dataclass(frozen=True)
class Side:
    """One row of the comparison: the base, A or B. Cost fields are None for the base."""

    role: str  # "base" | "A" | "B"
    path: str | None  # the document (None for the base)
    dlm_id: str | None
    version: str | None  # "v0003"
    adapter: str | None  # lora | qlora | dora (the base row: None)
    eval_loss: float | None  # token-weighted mean loss on A's held-out answer tokens
    perplexity: float | None  # exp(eval_loss)
    delta_kl: float | None  # mean per-token KL(this model || base) on the same tokens; 0 for the base
    steady_step_seconds: float | None  # median optimizer-step time, warm-up and eval/save pauses excluded
    train_seconds: float | None  # wall time of the version's run as the trainer recorded it
    steps: int | None
    peak_memory_bytes: int | None  # CUDA: max allocated; CPU: peak RSS of the training process
    trainable_params: int | None
    adapter_bytes: int | None  # *.safetensors bytes of the stored adapter
    stale: bool = False  # the document changed since this version was trained
    log: tuple[dict, ...] = field(default=(), repr=False)  # log.jsonl of the version, for the plot only
    # The learning report's mean token F1 of greedy answers to the held-out Q/A (docs/learning.md);
    # None when the version has no report or the held-out set has no Q/A.
    answer_f1: float | None = None
    # The learning report's share of held-out answers that match the document's exactly (same report).
    exact_match: float | None = None
    seed: int | None = None  # training.seed of the version (None for the base)
    pref_accuracy: float | None = None  # objective dpo: held-out preference accuracy (metrics.json)
    reward_margin: float | None = None  # objective dpo: held-out mean implicit reward margin; 0 for the base
    # The base load the row was scored on, as its adapter trained: "float32", "bfloat16+nf4" (QLoRA's
    # 4-bit weights, dequantized); the base row: A's. None when the scores do not say.
    scored_on: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: _finite(v) for k, v in asdict(self).items() if k != "log"}
        return data


@dataclass(frozen=True)
class Difference:
    key: str  # dotted path: "training.lora_dropout", "plan.micro_batch_size", "hardware.name"
    a: Any  # None when the key is absent on that side
    b: Any
    source: str  # "spec" (what the document says), "plan" (what the planner derived), "hardware"


@dataclass(frozen=True)
class Verdict:
    metric: str
    better: str  # "lower" | "higher"
    min_gain: float
    a_value: float | None
    b_value: float | None
    gain: float | None  # B's relative improvement over A (see the module docstring)
    b_pays: bool
    keep: str  # "A" | "B"
    step_time_ratio: float | None  # B / A
    memory_ratio: float | None
    train_time_ratio: float | None
    params_ratio: float | None
    adapter_bytes_ratio: float | None
    reason: str  # one line saying all of the above
    outcome: str = "inconclusive"  # "B pays" | "keep A" | "inconclusive" (module docstring)
    gain_low: float | None = None  # the bootstrap interval of the gain (None: no per-example figures)
    gain_high: float | None = None
    level: float = INTERVAL_LEVEL
    resamples: int = RESAMPLES
    examples: int | None = None  # held-out examples the interval resamples
    examples_needed: int | None = None  # about how many would put the observed gain's interval clear of min_gain
    gain_per_extra_train_second: float | None = None  # gain / (B's train seconds - A's), when B took longer

    def to_json(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Comparison:
    base: Side
    a: Side
    b: Side
    heldout_examples: int  # A's held-out examples, scored for all three rows
    heldout_tokens: int  # the answer tokens the loss and KL are averaged over
    corpus_a: str | None  # corpus_sha256 each version trained on
    corpus_b: str | None
    differences: tuple[Difference, ...]
    verdict: Verdict
    notes: tuple[str, ...] = ()  # caveats worth reading next to the numbers
    # per side: {"seeds", "versions", "values" (of the metric), "mean", "sd"} (compare's `seed_summary`)
    seeds: dict[str, Any] | None = None

    @property
    def sides(self) -> tuple[Side, Side, Side]:
        return (self.base, self.a, self.b)

    @property
    def same_data(self) -> bool:
        return self.corpus_a is not None and self.corpus_a == self.corpus_b

    def to_json(self) -> dict[str, Any]:
        """The stable `--json` object (docs/compare.md, "JSON"). Non-finite numbers become null."""
        return {
            "dlm_compare": SCHEMA_VERSION,
            "metric": self.verdict.metric,
            "min_gain": self.verdict.min_gain,
            "heldout": {"examples": self.heldout_examples, "tokens": self.heldout_tokens, "from": "A"},
            "data": {"same": self.same_data, "corpus_sha256": {"A": self.corpus_a, "B": self.corpus_b}},
            "sides": {s.role: s.to_json() for s in self.sides},
            "config_diff": [asdict(d) for d in self.differences],
            "verdict": self.verdict.to_json(),
            "notes": list(self.notes),
            "seeds": {
                role: {k: (_finite(v) if not isinstance(v, list) else [_finite(x) for x in v]) for k, v in s.items()}
                for role, s in (self.seeds or {}).items()
            },
        }


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- options, diff, verdict ----------------------------------------------------------------------


def check_options(metric: str, min_gain: float) -> None:
    """DlmError (exit 2) for a metric we do not know or a min gain that cannot mean anything."""
    if metric not in BETTER:
        raise DlmError(
            f"--metric must be one of {', '.join(BETTER)} (got {metric!r})",
            "eval_loss: held-out loss, lower is better; delta_kl: KL from the base, higher is better; "
            "answer_f1 / exact_match: the learning report's held-out answer F1 / exact share, higher is better",
        )
    lo, hi = MIN_GAIN_RANGE
    if not isinstance(min_gain, (int, float)) or not math.isfinite(min_gain) or not lo <= min_gain <= hi:
        raise DlmError(
            f"--min-gain must be a fraction between {lo:g} and {hi:g} (got {min_gain!r})",
            "0.05 asks B to be 5% better than A; a negative value tolerates B being that much worse",
        )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"training": {"lora_r": 8}} -> {"training.lora_r": 8}; lists and scalars are leaves."""
    if not isinstance(data, Mapping):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], source: str, prefix: str = "") -> list[Difference]:
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    keys = sorted(k for k in set(fa) | set(fb) if k.split(".")[-1] not in IDENTITY_KEYS)
    return [
        Difference(k, fa.get(k), fb.get(k), source) for k in keys if (k in fa) != (k in fb) or fa.get(k) != fb.get(k)
    ]


def config_diff(
    spec_a: Mapping[str, Any],
    spec_b: Mapping[str, Any],
    plan_a: Mapping[str, Any] | None = None,
    plan_b: Mapping[str, Any] | None = None,
    hardware_a: Mapping[str, Any] | None = None,
    hardware_b: Mapping[str, Any] | None = None,
) -> tuple[Difference, ...]:
    """Every key that differs between two trained versions, spec first, then plan decisions, then hardware.

    Specs are `Spec.model_dump(mode="json")` dicts, compared key path by key path (lists whole).
    `dlm_id` is left out: twins differ there by design (each side's id is in its `Side`). Plan
    decisions catch confounds the documents do not show (an `auto` micro batch resolving
    differently; a decision that merely repeats a listed spec difference is left out); hardware
    catches cost numbers measured on different machines.
    """
    found = _diff(spec_a, spec_b, "spec")
    if plan_a is not None and plan_b is not None:
        decisions = [{d["key"]: d["value"] for d in p.get("decisions", [])} for p in (plan_a, plan_b)]
        # A decision that only echoes a spec difference (plan.adapter = training.adapter) is noise.
        echoed = {(d.key.split(".")[-1], json.dumps(d.a), json.dumps(d.b)) for d in found}
        # A decision only one side makes (plan.dora_dropout for the DoRA twin) follows from a spec
        # difference already listed; only a decision both sides made differently is a confound.
        found += [
            d
            for d in _diff(decisions[0], decisions[1], "plan", "plan")
            if (d.key.split(".")[-1], json.dumps(d.a), json.dumps(d.b)) not in echoed
            and not (found and (d.key.split(".")[-1] not in decisions[0] or d.key.split(".")[-1] not in decisions[1]))
        ]
    if hardware_a is not None and hardware_b is not None:
        pick = [{k: h.get(k) for k in HARDWARE_KEYS if k in h} for h in (hardware_a, hardware_b)]
        found += _diff(pick[0], pick[1], "hardware", "hardware")
    return tuple(found)


def relative_gain(metric: str, a: float | None, b: float | None) -> float | None:
    """B's improvement over A as a fraction of A's value; None when either value is missing."""
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b):
        return None
    diff = (a - b) if BETTER[metric] == "lower" else (b - a)
    if a == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / abs(a)


def _ratio(b: float | None, a: float | None) -> float | None:
    return b / a if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > 0 and b >= 0 else None


def bootstrap_interval(
    metric: str,
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    level: float = INTERVAL_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """The paired bootstrap interval of B's gain over A. `a[i]` and `b[i]` are example i's additive
    figures (summed loss or KL over its tokens, its answer F1 or exact match), so a resample's gain is
    `relative_gain` of the two sums: for eval_loss (sum a - sum b) / sum a, the same ratio as the
    token-weighted means. None for fewer than 2 examples or unequal lengths."""
    n = len(a)
    if n < 2 or len(b) != n:
        return None
    rng = random.Random(seed)
    gains = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        gains.append(relative_gain(metric, sum(a[i] for i in pick), sum(b[i] for i in pick)))
    found = sorted(g for g in gains if g is not None and not math.isnan(g))
    if not found:
        return None
    tail = (1 - level) / 2
    return found[int(tail * (len(found) - 1))], found[math.ceil((1 - tail) * (len(found) - 1))]


def bootstrap_seeds_interval(
    metric: str,
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    resamples: int = RESAMPLES,
    level: float = INTERVAL_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """The interval when a side has several training seeds: `a[k][i]` is seed k's figure on example i.
    Each resample draws the examples (as `bootstrap_interval`) and, on each side, as many seeds as it
    has, with replacement; a side's figure for an example is the mean over the drawn seeds. The
    seed-to-seed spread thus widens the interval as the example spread does."""
    if not a or not b:
        return None
    n = len(a[0])
    if n < 2 or any(len(run) != n for run in (*a, *b)):
        return None
    rng = random.Random(seed)
    gains = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        seeds_a = [a[rng.randrange(len(a))] for _ in a]
        seeds_b = [b[rng.randrange(len(b))] for _ in b]
        total_a = sum(run[i] for run in seeds_a for i in pick) / len(seeds_a)
        total_b = sum(run[i] for run in seeds_b for i in pick) / len(seeds_b)
        gains.append(relative_gain(metric, total_a, total_b))
    found = sorted(g for g in gains if g is not None and not math.isnan(g))
    if not found:
        return None
    tail = (1 - level) / 2
    return found[int(tail * (len(found) - 1))], found[math.ceil((1 - tail) * (len(found) - 1))]


def examples_needed(gain: float | None, low: float | None, high: float | None, min_gain: float, n: int) -> int | None:
    """About how many held-out examples (like these) would put the interval of the observed gain clear
    of min_gain: the interval's half-width shrinks as 1 / sqrt(examples), so n x (half-width / |gain -
    min_gain|)^2. None when the gain sits on min_gain or there is no interval."""
    if gain is None or low is None or high is None or not all(map(math.isfinite, (gain, low, high))):
        return None
    margin = abs(gain - min_gain)
    if margin < EPS:
        return None
    return max(2, math.ceil(n * ((high - low) / 2 / margin) ** 2))


def decide(
    metric: str,
    min_gain: float,
    a: Side,
    b: Side,
    paired: tuple[Sequence[float], Sequence[float]] | None = None,
    *,
    seeds: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]] | None = None,
) -> Verdict:
    """The verdict rule (module docstring). Pure; `check_options` has vetted the arguments. `paired`
    holds A's and B's per-example figures for the bootstrap (None: no interval, so never `B pays`);
    `seeds` the same per training seed of each side (one seed each: the same as `paired`)."""
    if seeds is not None and len(seeds[0]) == 1 and len(seeds[1]) == 1:
        paired, seeds = (seeds[0][0], seeds[1][0]), None
    av, bv = getattr(a, metric), getattr(b, metric)
    gain = relative_gain(metric, av, bv)
    interval = None
    if gain is not None and seeds is not None:
        interval = bootstrap_seeds_interval(metric, *seeds)
        paired = (seeds[0][0], seeds[1][0])  # for the example count
    elif gain is not None and paired is not None:
        interval = bootstrap_interval(metric, *paired)
    low, high = interval or (None, None)
    if gain is None:
        outcome = "keep A"
    elif low is None or high is None:
        outcome = "inconclusive"
    elif low >= min_gain - EPS:
        outcome = "B pays"
    elif high < min_gain - EPS:
        outcome = "keep A"
    else:
        outcome = "inconclusive"
    pays = outcome == "B pays"
    ratios = {
        "step_time_ratio": _ratio(b.steady_step_seconds, a.steady_step_seconds),
        "memory_ratio": _ratio(b.peak_memory_bytes, a.peak_memory_bytes),
        "train_time_ratio": _ratio(b.train_seconds, a.train_seconds),
        "params_ratio": _ratio(b.trainable_params, a.trainable_params),
        "adapter_bytes_ratio": _ratio(b.adapter_bytes, a.adapter_bytes),
    }
    word = "lower" if BETTER[metric] == "lower" else "higher"
    if gain is None:
        judged = f"{metric} is missing on a side, so B cannot be shown to pay"
    else:
        where = {
            "B pays": "all at or above",
            "keep A": "all below",
            "inconclusive": "straddling" if interval else "no per-example figures, so no interval around",
        }[outcome]
        span = f"{pct(low)} to {pct(high)} ({INTERVAL_LEVEL:.0%} interval), " if interval else ""
        judged = (
            f"B's {metric} {bv:.4g} vs A's {av:.4g}: gain {pct(gain)} ({word} is better), "
            f"{span}{where} the {min_gain:.1%} min gain"
        )
    cost = ", ".join(
        f"x{v:.2f} {label}"
        for label, v in (("step time", ratios["step_time_ratio"]), ("peak memory", ratios["memory_ratio"]))
        if v is not None
    )
    reason = f"{outcome}: {judged}; B costs {cost or 'an unknown amount'}"
    extra = b.train_seconds - a.train_seconds if a.train_seconds is not None and b.train_seconds is not None else None
    n = len(paired[0]) if paired is not None else None
    return Verdict(
        metric,
        BETTER[metric],
        float(min_gain),
        av,
        bv,
        gain,
        pays,
        "B" if pays else "A",
        step_time_ratio=ratios["step_time_ratio"],
        memory_ratio=ratios["memory_ratio"],
        train_time_ratio=ratios["train_time_ratio"],
        params_ratio=ratios["params_ratio"],
        adapter_bytes_ratio=ratios["adapter_bytes_ratio"],
        reason=reason,
        outcome=outcome,
        gain_low=low,
        gain_high=high,
        examples=n,
        examples_needed=examples_needed(gain, low, high, min_gain, n) if n else None,
        gain_per_extra_train_second=gain / extra if gain is not None and extra is not None and extra > 0 else None,
    )


def pct(g: float | None) -> str:
    if g is None:
        return "?"
    return f"{g:+.2%}" if math.isfinite(g) else ("+inf" if g > 0 else "-inf")


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
