"""make_plan(spec, hardware, base, corpus) -> Plan: every knob decided, with its reason. Pure.

No I/O, no clock, no torch: the same values always give the same plan, so every machine is a JSON
fixture in the tests. The plan carries plain kwargs; only `train.py` turns them into `LoraConfig`,
`SFTConfig` and `from_pretrained` arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dlm.bases import BaseFacts
from dlm.corpus import CorpusStats
from dlm.hardware import HardwareFacts
from dlm.schema import Spec

Level = Literal["info", "warn", "block"]


@dataclass(frozen=True)
class Decision:
    key: str
    value: Any
    reason: str


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str
    hint: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimates:
    optimizer_steps: int
    tokens_per_step: int
    peak_memory_bytes: int
    step_seconds: float
    total_seconds: float
    memory_breakdown: dict[str, int] = field(default_factory=dict)  # weights, adapter, optimizer, activations, overhead
    measured: bool = False  # True once `doctor --probe` replaced the estimates


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    lora_kwargs: dict[str, Any]  # -> peft.LoraConfig(**lora_kwargs)
    sft_kwargs: dict[str, Any]  # -> trl.SFTConfig(output_dir=..., **sft_kwargs)
    model_kwargs: dict[str, Any]  # dtype (str), attn_implementation, quantization (BitsAndBytesConfig kwargs or None)
    findings: tuple[Finding, ...]
    estimates: Estimates
    reason: str
    world_size: int = 1

    @property
    def blocked(self) -> bool:
        return any(f.level == "block" for f in self.findings)

    def decision(self, key: str) -> Any:
        return next(d.value for d in self.decisions if d.key == key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(spec: Spec, hardware: HardwareFacts, base: BaseFacts, corpus: CorpusStats, *, world_size: int = 1) -> Plan:
    raise NotImplementedError
