"""`dlm compare A B`: is twin B worth what it costs over A, judged on the same held-out examples?

Owns the comparison's data types (`Side`, `Difference`, `Verdict`, `Comparison`), the config diff
between two trained versions, the verdict rule, the stable JSON shape (`SCHEMA_VERSION`) and
`compare()`, which finds (or, with `train=True`, trains) both current adapters and has
`infer.score_adapters` evaluate the base, A and B in one process on A's held-out examples.
Nothing here prints or imports torch: rendering lives in `render.comparison`, the PNG in `plot.py`.
docs/compare.md is the user-facing account of every definition below.

The verdict rule, in one place:
- A is the baseline (by convention the cheaper side, e.g. LoRA), B the candidate (e.g. DoRA).
- gain = B's improvement on the metric relative to A's value: (A - B) / A for eval_loss (lower is
  better), (B - A) / A for delta_kl (higher is better: the adapter moved the model further from the
  base on the document's own answers). When A's value is 0 the gain is 0 for a tie and +-inf
  otherwise (JSON: null, with `b_pays` still decided).
- B pays when gain >= min_gain (inclusive). A negative min_gain is a tolerance: B is kept even if
  it is worse by up to that fraction. Otherwise keep A. B's cost is stated either way as ratios
  B / A of steady step time, peak memory, training time, trainable parameters and adapter bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dlm.errors import DlmError, RunError

SCHEMA_VERSION = 1  # the `dlm_compare` field of to_json(); bumped only when a field changes meaning
BETTER = {"eval_loss": "lower", "delta_kl": "higher"}
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
        }


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- pure parts: options, diff, verdict -----------------------------------------------------------


def check_options(metric: str, min_gain: float) -> None:
    """DlmError (exit 2) for a metric we do not know or a min gain that cannot mean anything."""
    if metric not in BETTER:
        raise DlmError(
            f"--metric must be eval_loss or delta_kl (got {metric!r})",
            "eval_loss: held-out loss, lower is better; delta_kl: KL from the base, higher is better",
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


def decide(metric: str, min_gain: float, a: Side, b: Side) -> Verdict:
    """The verdict rule (module docstring). Pure; `check_options` has vetted the arguments."""
    av, bv = getattr(a, metric), getattr(b, metric)
    gain = relative_gain(metric, av, bv)
    pays = gain is not None and gain >= min_gain - EPS
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
        shown = f"{gain:+.2%}" if math.isfinite(gain) else ("+inf" if gain > 0 else "-inf")
        judged = (
            f"B's {metric} {bv:.4g} vs A's {av:.4g}: gain {shown} ({word} is better), "
            f"{'at least' if pays else 'below'} the {min_gain:.1%} min gain"
        )
    cost = ", ".join(
        f"x{v:.2f} {label}"
        for label, v in (("step time", ratios["step_time_ratio"]), ("peak memory", ratios["memory_ratio"]))
        if v is not None
    )
    reason = f"keep {'B' if pays else 'A'}: {judged}; B costs {cost or 'an unknown amount'}"
    return Verdict(
        metric, BETTER[metric], float(min_gain), av, bv, gain, pays, "B" if pays else "A", **ratios, reason=reason
    )


def perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


# --- reading stored versions ----------------------------------------------------------------------


def read_json(folder: Path, name: str) -> dict[str, Any]:
    """A version's JSON document, {} when it is absent (older versions); damage was caught by verify."""
    try:
        return json.loads((Path(folder) / name).read_text("utf-8"))
    except FileNotFoundError:
        return {}


def read_log(folder: Path) -> tuple[dict, ...]:
    path = Path(folder) / "log.jsonl"
    if not path.is_file():
        return ()
    return tuple(json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip())


def side_from_version(role: str, path: str, folder: Path, scores: Mapping[str, Any], *, stale: bool = False) -> Side:
    """A trained side: costs from the version's summary.json, quality from `scores` (loss, delta_kl)."""
    s = read_json(folder, "summary.json")
    spec = read_json(folder, "spec.json")
    adapter_bytes = s.get("adapter_bytes")
    if adapter_bytes is None:  # summaries written before adapter_bytes existed
        adapter_bytes = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    loss = scores.get("loss")
    return Side(
        role,
        str(path),
        spec.get("dlm_id"),
        Path(folder).name,
        (spec.get("training") or {}).get("adapter"),
        loss,
        perplexity(loss),
        scores.get("delta_kl"),
        s.get("steady_step_seconds"),
        s.get("seconds"),
        s.get("steps"),
        s.get("peak_memory_bytes"),
        s.get("trainable_params"),
        adapter_bytes,
        stale,
        read_log(folder),
    )


def base_side(name: str, loss: float | None) -> Side:
    return Side("base", None, None, None, None, loss, perplexity(loss), 0.0, None, None, None, None, None, None)


def assemble(
    folder_a: Path,
    folder_b: Path,
    path_a: str,
    path_b: str,
    scores: Mapping[str, Any],
    *,
    base_name: str,
    metric: str,
    min_gain: float,
    stale: tuple[bool, bool] = (False, False),
    notes: tuple[str, ...] = (),
) -> Comparison:
    """Comparison from two version folders and `infer.score_adapters`'s result. Pure but for reading files."""
    a = side_from_version(
        "A", path_a, folder_a, {"loss": scores["loss"]["A"], "delta_kl": scores["delta_kl"]["A"]}, stale=stale[0]
    )
    b = side_from_version(
        "B", path_b, folder_b, {"loss": scores["loss"]["B"], "delta_kl": scores["delta_kl"]["B"]}, stale=stale[1]
    )
    names = ("spec", "plan", "hardware", "summary")
    docs = [{n: read_json(f, f"{n}.json") for n in names} for f in (folder_a, folder_b)]
    diff = config_diff(
        docs[0]["spec"], docs[1]["spec"], docs[0]["plan"], docs[1]["plan"], docs[0]["hardware"], docs[1]["hardware"]
    )
    notes = list(notes)
    if any(d.source == "hardware" for d in diff):
        notes.append("A and B were trained on different hardware: their cost ratios compare machines, not methods")
    return Comparison(
        base_side(base_name, scores["loss"]["base"]),
        a,
        b,
        int(scores["examples"]),
        int(scores["tokens"]),
        docs[0]["summary"].get("corpus_sha256"),
        docs[1]["summary"].get("corpus_sha256"),
        diff,
        decide(metric, min_gain, a, b),
        tuple(notes),
    )


# --- the command --------------------------------------------------------------------------------


def _refuse_different_data(path_a: Any, path_b: Any, ha: str | None, hb: str | None) -> None:
    raise DlmError(
        f"B trains on other examples than A ({path_a}): corpus {str(ha)[:12]} vs {str(hb)[:12]}, "
        "so their held-out losses would not measure the same thing",
        f"twins should differ only in their training knobs: `dlm twin {path_a} --set training.adapter=dora -o B.dlm`; "
        "or pass --allow-different-data to score both on A's held-out examples anyway",
        str(path_b),
    )


def compare(
    path_a: str | Path,
    path_b: str | Path,
    home: Path,
    *,
    metric: str = "eval_loss",
    min_gain: float = 0.05,
    allow_different_data: bool = False,
    train: bool = False,
    hardware: Any = None,
    on_train: Callable[[str, str, str], Mapping[str, Any] | None] | None = None,
    batch_size: int = 4,
    device: str | None = None,
) -> Comparison:
    """Evaluate the base, A's and B's current adapters on A's held-out examples and judge B.

    Raises DlmError (exit 2) before any weights load when the options are bad, both paths are one
    document, the twins' corpora or bases differ (unless `allow_different_data` for the corpus), A
    has no held-out examples, or a side has no adapter and `train` is False. With `train`, a side
    with no adapter or a stale one is trained first through `runs.train_document`; `on_train(role,
    path, why)` may return extra keyword arguments for it (on_plan / on_step / on_event).
    """
    from dlm.plan.hardware import probe_light
    from dlm.plan.prepare import prepare
    from dlm.store import current
    from dlm.store.store import open_store
    from dlm.train import runs

    check_options(metric, min_gain)
    hw = hardware or probe_light()
    paths = (str(path_a), str(path_b))
    preps = [prepare(p, hw, purpose="inspect") for p in paths]  # every bad-input error comes before work
    if preps[0].spec.dlm_id == preps[1].spec.dlm_id:
        raise DlmError(
            f"B has A's dlm_id {preps[0].spec.dlm_id} ({paths[0]}): one store, not twins",
            f"`dlm twin {paths[0]} --set training.adapter=dora -o B.dlm` makes a twin with its own id",
            paths[1],
        )
    if preps[0].base.location != preps[1].base.location:
        raise DlmError(
            f"B trains base {preps[1].spec.base_model}, A trains {preps[0].spec.base_model}: "
            "the base row and the KL need one base",
            "compare twins that differ in training knobs only",
            paths[1],
        )
    if not preps[0].heldout:
        raise DlmError(
            "A has no held-out examples, so compare cannot judge quality",
            "set training.eval_fraction above 0 (default 0.1), or pin a section with ::instruction heldout::",
            paths[0],
        )
    hashes = [current.corpus_sha256(p) for p in preps]
    if hashes[0] != hashes[1] and not allow_different_data:
        _refuse_different_data(paths[0], paths[1], *hashes)

    found: list[Any] = []
    for p, prep in zip(paths, preps):
        store = open_store(home, prep.spec.dlm_id, Path(prep.doc.path), prep.spec.base_model, readonly=True)
        found.append(current.current(p, home, hw) if store.current_version() is not None else None)
    notes: list[str] = []
    train_hw, trained_here = None, []
    for i, (role, p) in enumerate(zip("AB", paths)):
        cur = found[i]
        why = (
            "it has no adapter yet"
            if cur is None
            else (f"the document changed since {cur.version_dir.name}" if cur.stale else None)
        )
        if why and train:
            if train_hw is None:
                from dlm.train.device import probe

                train_hw = probe()
            hooks = dict((on_train(role, p, why) if on_train else None) or {})
            outcome = runs.train_document(p, home, train_hw, **hooks)
            if outcome.version is None:  # interrupted (Ctrl-C saves a checkpoint): nothing new to compare
                raise RunError(
                    f"training {role} stopped at step {outcome.summary.steps} before it finished",
                    f"`dlm train {p} --resume` continues it; then run dlm compare again",
                    p,
                )
            found[i] = current.current(p, home, hw)
            trained_here.append(role)
            if trained_here == ["A", "B"] and train_hw.device != "cuda":
                notes.append(
                    "A and B trained in this one process: without CUDA, peak memory is the process's peak "
                    "RSS, so B's figure includes A's run; separate `dlm train` calls give fair figures"
                )
            notes.append(f"trained {role}: {why}")
        elif cur is None:
            raise DlmError(
                f"{role} has no trained adapter yet",
                f"`dlm compare {paths[0]} {paths[1]} --train` trains it first, or run `dlm train {p}`",
                p,
            )
        elif cur.stale:
            notes.append(f"{role} is stale: {p} changed since {cur.version_dir.name} was trained (--train retrains it)")
    cur_a, cur_b = found
    trained = [c.summary.get("corpus_sha256") or current.corpus_sha256(c.prepared) for c in found]
    if trained[0] != trained[1]:
        if not allow_different_data:
            _refuse_different_data(paths[0], paths[1], *trained)
        leaked = {e.id for e in cur_a.prepared.heldout} & {e.id for e in cur_b.prepared.train}
        notes.append(
            f"A and B trained on different examples (--allow-different-data); {len(leaked)} of A's "
            f"{len(cur_a.prepared.heldout)} held-out examples are in B's training set"
        )

    from dlm.train import basefolder
    from dlm.use import infer

    plan_a = cur_a.prepared.plan
    scores = infer.score_adapters(
        basefolder.materialize(cur_a.prepared.base, home),
        {"A": cur_a.version_dir, "B": cur_b.version_dir},
        cur_a.prepared.heldout,
        max_length=plan_a.sft_kwargs.get("max_length"),
        batch_size=batch_size,
        trust_remote_code=cur_a.prepared.spec.trust_remote_code,
        dtype=plan_a.model_kwargs.get("dtype") or "float32",
        device=device,
    )
    return assemble(
        cur_a.version_dir,
        cur_b.version_dir,
        paths[0],
        paths[1],
        scores,
        base_name=cur_a.prepared.spec.base_model,
        metric=metric,
        min_gain=min_gain,
        stale=(cur_a.stale, cur_b.stale),
        notes=tuple(notes),
    )
