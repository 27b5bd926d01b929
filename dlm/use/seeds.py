"""`dlm compare --seeds N`: the versions of each side's further training seeds (found in its store or
trained), each side's row as the mean over its seeds, and the per-side seed summary and note.
docs/compare.md ("Several seeds") is the user-facing account. Nothing here imports torch."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlm.errors import DlmError, RunError
from dlm.use.verdict import Side, perplexity

if TYPE_CHECKING:
    from dlm.plan.hardware import HardwareFacts
    from dlm.store.current import Current


def read_json(folder: Path, name: str) -> dict[str, Any]:
    """A version's JSON document, {} when it is absent (older versions); damage was caught by verify.
    compare reads versions with it too (it lives here, the lower of the two modules)."""
    try:
        return json.loads((Path(folder) / name).read_text("utf-8"))
    except FileNotFoundError:
        return {}


def _mean(values: Sequence[float | None]) -> float | None:
    return (
        None if not values or any(v is None for v in values) else sum(v for v in values if v is not None) / len(values)
    )


def seed_mean(side: Side, runs: Sequence[Mapping[str, float | None]]) -> Side:
    """The side's row: each quality figure averaged over its seeds (one seed: that run's figures)."""
    loss = _mean([r["eval_loss"] for r in runs])
    return replace(
        side,
        eval_loss=loss,
        perplexity=perplexity(loss),
        delta_kl=_mean([r["delta_kl"] for r in runs]),
        answer_f1=_mean([r["answer_f1"] for r in runs]),
        exact_match=_mean([r["exact_match"] for r in runs]),
        pref_accuracy=_mean([r["pref_accuracy"] for r in runs]),
        reward_margin=_mean([r["reward_margin"] for r in runs]),
    )


def seed_summary(
    metric: str, runs: Sequence[tuple[str, Path]], quality: Sequence[Mapping[str, float | None]]
) -> dict[str, Any]:
    """Per side: each seed's version and value of the metric, their mean and sample standard deviation."""
    values = [q[metric] for q in quality]
    mean = _mean(values)
    sd = None
    if mean is not None and len(values) > 1:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values if v is not None) / (len(values) - 1))
    return {
        "seeds": [(read_json(f, "spec.json").get("training") or {}).get("seed") for _, f in runs],
        "versions": [Path(f).name for _, f in runs],
        "values": values,
        "mean": mean,
        "sd": sd,
    }


def seed_note(metric: str, seeds: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for role in ("A", "B"):
        s = seeds[role]
        spread = f"sd {s['sd']:.4g}" if s["sd"] is not None else "one seed"
        mean = f"{s['mean']:.4g}" if s["mean"] is not None else "?"
        parts.append(f"{role} {mean} ({spread}, seeds {', '.join(map(str, s['seeds']))})")
    return (
        f"{metric} over seeds: " + "; ".join(parts) + ". The interval resamples seeds as well as examples, "
        "so it includes the seed-to-seed spread"
    )


def seed_versions(
    role: str,
    path: str,
    cur: Current,
    n: int,
    home: Path,
    hw: HardwareFacts,
    *,
    train: bool,
    on_train: Callable[[str, str, str], Mapping[str, Any] | None] | None,
) -> tuple[list[Path], list[int]]:
    """The versions of seeds seed + 1 .. seed + n - 1 of one side (seed: the current version's), and
    the seeds trained now. A version counts for a seed when its spec.json has that training.seed and
    it trained this very document and corpus (summary doc_sha256 and corpus_sha256 equal to the
    current version's); the newest such wins. Missing seeds are trained with `train` (each a new
    version of the side's store), after which the current version is switched back, so the store's
    current adapter stays the one compare was asked about; without `train`, DlmError (exit 2)."""
    from dlm.store.integrity import verify

    first = int((read_json(cur.version_dir, "spec.json").get("training") or {}).get("seed", 0))
    wanted = [first + k for k in range(1, n)]
    key = (cur.summary.get("doc_sha256"), cur.summary.get("corpus_sha256"))
    found: dict[int, Path] = {}
    for folder in cur.store.versions():
        summary = read_json(folder, "summary.json")
        seed = (read_json(folder, "spec.json").get("training") or {}).get("seed")
        if seed in wanted and (summary.get("doc_sha256"), summary.get("corpus_sha256")) == key:
            found[seed] = folder  # versions are oldest first: the newest wins
    missing = [s for s in wanted if s not in found]
    if missing and not train:
        raise DlmError(
            f"{role} has no version trained with seed{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(str, missing))} of this document",
            f"add --train to train them, or `dlm train {path} --seed {missing[0]}`",
            path,
        )
    if missing:
        from dlm.train import device, runs

        train_hw = device.probe()
        for seed in missing:
            hooks = dict((on_train(role, path, f"seed {seed} of {n}") if on_train else None) or {})
            outcome = runs.train_document(path, home, train_hw, seed=seed, **hooks)
            if outcome.version is None:
                raise RunError(
                    f"training {role} with seed {seed} stopped before it finished",
                    f"`dlm train {path} --seed {seed} --resume` continues it; then run dlm compare again",
                    path,
                )
            found[seed] = outcome.store.root / "versions" / outcome.version
        with outcome.store.lock():
            outcome.store.switch(cur.version_dir.name)
    for folder in found.values():
        verify(folder)
    return [found[s] for s in wanted], missing
