"""`dlm compare A B`: find (or, with `train=True`, train) both twins' current adapters and judge B.

`compare()` checks the two documents are twins, finds each current version in its store (training a
side that has none or a stale one when asked), has `infer.score_adapters` evaluate the base, A and B
in one process on A's held-out examples, and reads the versions' stored documents into a
`verdict.Comparison`. The judgement itself (data types, config diff, verdict rule, JSON) lives in
`verdict.py`. Nothing here prints or imports torch at import time. docs/compare.md is the
user-facing account.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlm.errors import DlmError, RunError
from dlm.use.verdict import Comparison, Side, check_options, config_diff, decide, perplexity

if TYPE_CHECKING:
    from dlm.plan.hardware import HardwareFacts
    from dlm.plan.prepare import Prepared
    from dlm.store.current import Current


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
        held_out_f1(folder),
        *preference_scores(folder),
    )


def preference_scores(folder: Path, *, base: bool = False) -> tuple[float | None, float | None]:
    """objective dpo: the version's held-out preference accuracy and reward margin (the base's: its
    own accuracy, and a margin of 0, the implicit reward's zero); None without preference figures."""
    m = read_json(folder, "metrics.json")
    if not m.get("pref_n"):
        return None, None
    return (m.get("base_pref_accuracy"), 0.0) if base else (m.get("pref_accuracy"), m.get("reward_margin"))


def held_out_f1(folder: Path, *, base: bool = False) -> float | None:
    """The version's learning report (metrics.json): held-out answer F1 of the adapter (or the base)."""
    heldout = (read_json(folder, "metrics.json").get("learning") or {}).get("heldout") or {}
    return heldout.get("base_f1" if base else "f1") if heldout.get("n") else None


def base_side(
    name: str,
    loss: float | None,
    answer_f1: float | None = None,
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
    if any(d.source == "hardware" for d in diff):
        notes = (*notes, "A and B were trained on different hardware: their cost ratios compare machines, not methods")
    return Comparison(
        base_side(
            base_name,
            scores["loss"]["base"],
            held_out_f1(folder_a, base=True),
            preference_scores(folder_a, base=True),
        ),
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

    check_options(metric, min_gain)
    hw = hardware or probe_light()
    paths = (str(path_a), str(path_b))
    preps = _check_twins(paths, hw, allow_different_data)
    found, notes = _current_adapters(paths, preps, home, hw, train=train, on_train=on_train)
    cur_a, cur_b = found
    notes += _check_trained_data(paths, cur_a, cur_b, allow_different_data)
    scores = _score(cur_a, cur_b, home, batch_size=batch_size, device=device)
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
    paths: tuple[str, str], cur_a: Current, cur_b: Current, allow_different_data: bool
) -> list[str]:
    """DlmError when the versions trained on different corpora (unless allowed); else a note saying so."""
    from dlm.store import current

    trained = [c.summary.get("corpus_sha256") or current.corpus_sha256(c.prepared) for c in (cur_a, cur_b)]
    if trained[0] == trained[1]:
        return []
    if not allow_different_data:
        _refuse_different_data(paths[0], paths[1], *trained)
    leaked = {e.id for e in cur_a.prepared.heldout} & {e.id for e in cur_b.prepared.train}
    return [
        f"A and B trained on different examples (--allow-different-data); {len(leaked)} of A's "
        f"{len(cur_a.prepared.heldout)} held-out examples are in B's training set"
    ]


def _score(cur_a: Current, cur_b: Current, home: Path, *, batch_size: int, device: str | None) -> dict[str, Any]:
    """`infer.score_adapters` on the base, A and B over A's held-out examples (the only heavy step)."""
    from dlm.train import basefolder
    from dlm.use import infer

    plan_a = cur_a.prepared.plan
    return infer.score_adapters(
        basefolder.materialize(cur_a.prepared.base, home),
        {"A": cur_a.version_dir, "B": cur_b.version_dir},
        cur_a.prepared.heldout,
        max_length=plan_a.sft_kwargs.get("max_length"),
        batch_size=batch_size,
        trust_remote_code=cur_a.prepared.spec.trust_remote_code,
        dtype=plan_a.model_kwargs.get("dtype") or "float32",
        device=device,
    )
