"""`dlm compare A B`: find (or, with `train=True`, train) both twins' current adapters and judge B.

`compare()` checks the two documents are twins, finds each current version in its store (training a
side that has none or a stale one when asked), has `infer.score_adapters` evaluate the base, A and B
in one process on A's held-out examples (each adapter on the base as it was trained), and reads the
versions' stored documents into a `verdict.Comparison`. The judgement itself (data types, config
diff, verdict rule, JSON) lives in `verdict.py`, `--seeds` in `seeds.py`. Nothing here prints or
imports torch at import time. docs/compare.md is the user-facing account.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlm.errors import DlmError, RunError
from dlm.use.seeds import read_json, seed_mean, seed_note, seed_summary, seed_versions
from dlm.use.verdict import Comparison, Side, Verdict, check_options, config_diff, decide, perplexity

if TYPE_CHECKING:
    from dlm.plan.corpus import Example
    from dlm.plan.hardware import HardwareFacts
    from dlm.plan.prepare import Prepared
    from dlm.store.current import Current


MAX_SEEDS = 20  # --seeds: each seed is a training run per side

# --- reading stored versions ----------------------------------------------------------------------


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
        held_out_f1(folder),
        held_out_exact(folder),
        (spec.get("training") or {}).get("seed"),
        *preference_scores(folder),
    )


def preference_scores(folder: Path, *, base: bool = False) -> tuple[float | None, float | None]:
    """objective dpo: the version's held-out preference accuracy and reward margin (the base's: its
    own accuracy, and a margin of 0, the implicit reward's zero); None without preference figures."""
    m = read_json(folder, "metrics.json")
    if not m.get("pref_n"):
        return None, None
    return (m.get("base_pref_accuracy"), 0.0) if base else (m.get("pref_accuracy"), m.get("reward_margin"))


def preference_per_example(folder: Path) -> dict[str, tuple[float, float, float]] | None:
    """objective dpo: per held-out triple id, (the adapter's log p(chosen) - log p(rejected), the
    base's, beta) from the version's metrics.json (`pref_per_example`; beta: the measurement's, else
    the plan's); None for a version without the record (trained before it existed) or an sft one."""
    m = read_json(folder, "metrics.json")
    rec = m.get("pref_per_example") or {}
    ids, mine, base = rec.get("ids") or [], rec.get("logp_margin") or [], rec.get("base_logp_margin") or []
    beta = (m.get("preference") or {}).get("beta")
    if beta is None:
        beta = ((read_json(folder, "plan.json").get("dpo_kwargs")) or {}).get("beta")
    if not ids or len(ids) != len(mine) or len(ids) != len(base) or beta is None:
        return None
    return {i: (float(c), float(b), float(beta)) for i, c, b in zip(ids, mine, base)}


def held_out_f1(folder: Path, *, base: bool = False) -> float | None:
    """The version's learning report (metrics.json): held-out answer F1 of the adapter (or the base)."""
    heldout = (read_json(folder, "metrics.json").get("learning") or {}).get("heldout") or {}
    return heldout.get("base_f1" if base else "f1") if heldout.get("n") else None


def held_out_exact(folder: Path, *, base: bool = False) -> float | None:
    """The learning report's share of held-out answers that match exactly (adapter, or the base)."""
    heldout = (read_json(folder, "metrics.json").get("learning") or {}).get("heldout") or {}
    n = heldout.get("n")
    exact = heldout.get("base_exact" if base else "exact")
    return exact / n if n and isinstance(exact, (int, float)) else None


def held_out_answers(folder: Path) -> dict[str, dict[str, Any]]:
    """The learning report's answers to held-out questions, by example id."""
    learning = read_json(folder, "metrics.json").get("learning") or {}
    answers, n = learning.get("answers") or [], (learning.get("heldout") or {}).get("n") or 0
    tail = answers[len(answers) - n :] if n else []  # the report lists the training sample first
    return {a["id"]: a for a in tail if "id" in a}


def run_figures(
    metric: str, scores: Mapping[str, Any], runs_a: Sequence[tuple[str, Path]], runs_b: Sequence[tuple[str, Path]]
) -> tuple[list[list[float]], list[list[float]]] | None:
    """Per-example figures of every scored run (name, version folder) of A and of B, example i at
    index i in each; None when any run lacks them.

    eval_loss / delta_kl: each scored example's summed loss / KL (from `infer.score_adapters`);
    answer_f1 / exact_match: each held-out question every run's learning report answered;
    pref_accuracy / reward_margin: each of A's held-out triples (`preference_per_example`), 1 / 0 as
    the adapter prefers the chosen answer or not, beta x (its log-prob margin - the base's); None
    unless every run recorded the same triples."""
    every = [*runs_a, *runs_b]
    if metric in ("pref_accuracy", "reward_margin"):
        records = [preference_per_example(folder) for _, folder in every]
        ids = list(records[0] or {})  # A's held-out triples, in A's order
        if not ids or any(r is None or set(r) != set(ids) for r in records):
            return None  # a version from before the per-triple record, or another held-out set
        if metric == "pref_accuracy":
            lists = [[1.0 if r[i][0] > 0 else 0.0 for i in ids] for r in records if r is not None]
        else:
            lists = [[r[i][2] * (r[i][0] - r[i][1]) for i in ids] for r in records if r is not None]
    elif metric in ("eval_loss", "delta_kl"):
        per = (scores.get("per_example") or {}).get("loss_sum" if metric == "eval_loss" else "kl_sum") or {}
        found = [per.get(name) for name, _ in every]
        if any(f is None for f in found) or len({len(f) for f in found if f is not None}) != 1:
            return None
        lists = [list(f) for f in found if f is not None]
    else:
        answers = [held_out_answers(folder) for _, folder in every]
        ids = [i for i in answers[0] if all(i in a for a in answers[1:])]
        if not ids:
            return None
        field = "f1" if metric == "answer_f1" else "exact"
        lists = [[float(a[i][field]) for i in ids] for a in answers]
    return lists[: len(runs_a)], lists[len(runs_a) :]


def base_side(
    name: str,
    loss: float | None,
    answer_f1: float | None = None,
    exact_match: float | None = None,
    pref: tuple[float | None, float | None] = (None, None),
) -> Side:
    return Side(
        "base",
        None,
        None,
        None,
        None,
        loss,
        perplexity(loss),
        0.0,
        None,
        None,
        None,
        None,
        None,
        None,
        answer_f1=answer_f1,
        exact_match=exact_match,
        pref_accuracy=pref[0],
        reward_margin=pref[1],
    )


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
    more_seeds: tuple[Sequence[Path], Sequence[Path]] = ((), ()),
) -> Comparison:
    """Comparison from two version folders and `infer.score_adapters`'s result. Pure but for reading files.

    `more_seeds`: further versions of A and of B (other training seeds, scored as "A1", "A2", ... and
    "B1", ...): each side's row is then the mean over its seeds, and the interval resamples seeds too."""
    runs_a = [("A", folder_a), *((f"A{i}", f) for i, f in enumerate(more_seeds[0], 1))]
    runs_b = [("B", folder_b), *((f"B{i}", f) for i, f in enumerate(more_seeds[1], 1))]
    a = seed_mean(
        side_from_version("A", path_a, folder_a, {}, stale=stale[0]), [_quality(scores, n, f) for n, f in runs_a]
    )
    b = seed_mean(
        side_from_version("B", path_b, folder_b, {}, stale=stale[1]), [_quality(scores, n, f) for n, f in runs_b]
    )
    names = ("spec", "plan", "hardware", "summary")
    docs = [{n: read_json(f, f"{n}.json") for n in names} for f in (folder_a, folder_b)]
    diff = config_diff(
        docs[0]["spec"], docs[1]["spec"], docs[0]["plan"], docs[1]["plan"], docs[0]["hardware"], docs[1]["hardware"]
    )
    if any(d.source == "hardware" for d in diff):
        notes = (*notes, "A and B were trained on different hardware: their cost ratios compare machines, not methods")
    loads = scores.get("loads") or {}
    on = {role: "/".join(sorted({str(loads.get(n)) for n, _ in runs})) for role, runs in (("A", runs_a), ("B", runs_b))}
    if loads and on["A"] != on["B"]:
        notes = (*notes, load_note(on["A"], on["B"], loads.get("base")))
    a, b = replace(a, scored_on=on["A"] if loads else None), replace(b, scored_on=on["B"] if loads else None)
    figures = run_figures(metric, scores, runs_a, runs_b)
    verdict = decide(metric, min_gain, a, b, seeds=figures)
    seeds = {
        role: seed_summary(metric, runs, [_quality(scores, n, f) for n, f in runs])
        for role, runs in (("A", runs_a), ("B", runs_b))
    }
    if len(runs_a) > 1 or len(runs_b) > 1:
        notes = (*notes, seed_note(metric, seeds))
    notes = (*notes, *resolution_notes(verdict))
    return Comparison(
        replace(
            base_side(
                base_name,
                scores["loss"]["base"],
                held_out_f1(folder_a, base=True),
                held_out_exact(folder_a, base=True),
                preference_scores(folder_a, base=True),
            ),
            scored_on=loads.get("base"),
        ),
        a,
        b,
        int(scores["examples"]),
        int(scores["tokens"]),
        docs[0]["summary"].get("corpus_sha256"),
        docs[1]["summary"].get("corpus_sha256"),
        diff,
        verdict,
        tuple(notes),
        seeds,
    )


def _quality(scores: Mapping[str, Any], name: str, folder: Path) -> dict[str, float | None]:
    """One scored run's quality figures: loss and KL from `scores`, answer F1 / exact from its report,
    preference accuracy and reward margin from its metrics (objective dpo)."""
    pref_accuracy, reward_margin = preference_scores(folder)
    return {
        "eval_loss": scores["loss"].get(name),
        "delta_kl": scores["delta_kl"].get(name),
        "answer_f1": held_out_f1(folder),
        "exact_match": held_out_exact(folder),
        "pref_accuracy": pref_accuracy,
        "reward_margin": reward_margin,
    }


def load_note(on_a: str, on_b: str, base: str | None) -> str:
    """The note for twins trained on different base loads (LoRA in fp32 against QLoRA, say)."""

    def words(load: str) -> str:
        return f"{load} (the 4-bit weights QLoRA trained on, dequantized)" if "+" in load else load

    return (
        f"A and B were scored on different bases, each as its adapter was trained: A on {words(on_a)}, "
        f"B on {words(on_b)}. Each delta_kl is from the side's own base; the base row is the base as A "
        f"was trained ({base or on_a})"
    )


def resolution_notes(v: Verdict) -> tuple[str, ...]:
    """What an inconclusive verdict would need: about how many held-out examples like these."""
    if v.outcome != "inconclusive":
        return ()
    if v.gain_low is None and v.metric in ("pref_accuracy", "reward_margin"):
        return (
            f"no per-example {v.metric} figures to resample, so the gain has no interval (a version trained "
            "before dlm recorded each held-out triple's margins, or the sides held out different triples: "
            "retrain to get one)",
        )
    if v.gain_low is None:
        return (f"no per-example {v.metric} figures to resample, so the gain has no interval",)
    if v.examples_needed is None and v.gain is not None and math.isfinite(v.gain):
        return (f"the observed gain sits on the {v.min_gain:.1%} min gain: no number of examples would separate them",)
    return (
        f"about {v.examples_needed} held-out examples like these (now {v.examples}) would put the interval of "
        f"the observed gain {v.gain:+.2%} clear of the {v.min_gain:.1%} min gain",
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
    seeds: int = 1,
) -> Comparison:
    """Evaluate the base, A's and B's current adapters on A's held-out examples and judge B.

    Raises DlmError (exit 2) before any weights load when the options are bad, both paths are one
    document, the twins' corpora or bases differ (unless `allow_different_data` for the corpus), A
    has no held-out examples, or a side has no adapter and `train` is False. With `train`, a side
    with no adapter or a stale one is trained first through `runs.train_document`; `on_train(role,
    path, why)` may return extra keyword arguments for it (on_plan / on_step / on_event).

    `seeds` > 1: each side is judged on `seeds` versions trained with training.seed, seed + 1, ...
    (its document's seed first), found in its store or, with `train`, trained now (`seeds.seed_versions`).
    """
    from dlm.plan.hardware import probe_light

    check_options(metric, min_gain)
    if not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        raise DlmError(
            f"--seeds must be a whole number from 1 to {MAX_SEEDS} (got {seeds!r})",
            "--seeds 3 trains and scores three seeds of each side",
        )
    hw = hardware or probe_light()
    paths = (str(path_a), str(path_b))
    preps = _check_twins(paths, hw, allow_different_data)
    found, notes = _current_adapters(paths, preps, home, hw, train=train, on_train=on_train)
    cur_a, cur_b = found
    splits = trained_split(cur_a), trained_split(cur_b)
    notes += _check_trained_data(paths, cur_a, cur_b, allow_different_data, splits)
    more: tuple[list[Path], list[Path]] = ([], [])
    if seeds > 1:
        for i, (role, p, cur) in enumerate((("A", paths[0], cur_a), ("B", paths[1], cur_b))):
            extra, trained = seed_versions(role, p, cur, seeds, home, hw, train=train, on_train=on_train)
            more[i].extend(extra)
            notes += [f"trained {role} with seed {s}" for s in trained]
    adapters = {"A": cur_a.version_dir, "B": cur_b.version_dir}
    adapters |= {f"A{i}": f for i, f in enumerate(more[0], 1)} | {f"B{i}": f for i, f in enumerate(more[1], 1)}
    scores = _score(cur_a, splits[0][1], adapters, home, batch_size=batch_size, device=device)
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
        more_seeds=more,
    )


def _check_twins(paths: tuple[str, str], hw: HardwareFacts, allow_different_data: bool) -> list[Prepared]:
    """Both documents prepared; DlmError unless they are twins A can be judged against."""
    from dlm.plan.prepare import prepare
    from dlm.store import current

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
    return preps


def _current_adapters(
    paths: tuple[str, str],
    preps: list[Prepared],
    home: Path,
    hw: HardwareFacts,
    *,
    train: bool,
    on_train: Callable[[str, str, str], Mapping[str, Any] | None] | None,
) -> tuple[list[Current], list[str]]:
    """Each side's current version, trained first where `train` allows it; the notes worth reading."""
    from dlm.store import current
    from dlm.store.opening import open_store

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
            found[i] = _train_side(role, p, why, home, hw, train_hw, on_train)
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
    return found, notes


def _train_side(
    role: str,
    path: str,
    why: str,
    home: Path,
    hw: HardwareFacts,
    train_hw: HardwareFacts,
    on_train: Callable[[str, str, str], Mapping[str, Any] | None] | None,
) -> Current:
    """Train one side through `runs.train_document` and return its new current version."""
    from dlm.store import current
    from dlm.train import runs

    hooks = dict((on_train(role, path, why) if on_train else None) or {})
    outcome = runs.train_document(path, home, train_hw, **hooks)
    if outcome.version is None:  # interrupted (Ctrl-C saves a checkpoint): nothing new to compare
        raise RunError(
            f"training {role} stopped at step {outcome.summary.steps} before it finished",
            f"`dlm train {path} --resume` continues it; then run dlm compare again",
            path,
        )
    return current.current(path, home, hw)


def _check_trained_data(
    paths: tuple[str, str],
    cur_a: Current,
    cur_b: Current,
    allow_different_data: bool,
    splits: tuple[tuple[tuple[Example, ...], tuple[Example, ...]], ...],
) -> list[str]:
    """DlmError when the versions trained on different corpora (unless allowed); else a note saying so."""
    from dlm.store import current

    trained = [c.summary.get("corpus_sha256") or current.corpus_sha256(c.prepared) for c in (cur_a, cur_b)]
    if trained[0] == trained[1]:
        return []
    if not allow_different_data:
        _refuse_different_data(paths[0], paths[1], *trained)
    leaked = {e.id for e in splits[0][1]} & {e.id for e in splits[1][0]}
    return [
        f"A and B trained on different examples (--allow-different-data); {len(leaked)} of A's "
        f"{len(splits[0][1])} held-out examples are in B's training set"
    ]


def trained_split(cur: Current) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, heldout) as the version was trained: the held-out ids its summary recorded, or, for a
    version recorded before the split stopped following the training seed, that seed's draw
    (`corpus.legacy_split` with the version's own spec), never today's rule applied after the fact."""
    from dlm.plan import corpus

    ordered = corpus.examples(cur.prepared.doc, cur.prepared.spec.system_prompt)  # source order, as prepare
    recorded = (cur.summary.get("split") or {}).get("heldout")
    if isinstance(recorded, list):
        held = set(recorded)
        heldout = tuple(e for e in ordered if e.id in held)
        if heldout:
            return tuple(e for e in ordered if e.id not in held), heldout
        return cur.prepared.train, cur.prepared.heldout  # the document changed past every recorded id
    training = read_json(cur.version_dir, "spec.json").get("training") or {}
    seed = training.get("seed", cur.prepared.spec.training.seed)
    fraction = training.get("eval_fraction", cur.prepared.spec.training.eval_fraction)
    return corpus.legacy_split(ordered, int(seed), float(fraction))


def _score(
    cur_a: Current,
    heldout: tuple[Example, ...],
    adapters: dict[str, Path],
    home: Path,
    *,
    batch_size: int,
    device: str | None,
) -> dict[str, Any]:
    """`infer.score_adapters` on the base, A and B over A's held-out examples (the only heavy step):
    each adapter on the base load its version's plan records; A's plan dtype for a version without one."""
    from dlm.train import basefolder
    from dlm.use import infer

    plan_a = cur_a.prepared.plan
    return infer.score_adapters(
        basefolder.materialize(cur_a.prepared.base, home),
        adapters,
        heldout,
        max_length=plan_a.sft_kwargs.get("max_length"),
        batch_size=batch_size,
        trust_remote_code=cur_a.prepared.spec.trust_remote_code,
        dtype=plan_a.model_kwargs.get("dtype") or "float32",
        device=device,
    )
