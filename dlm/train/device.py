"""The machine's facts as torch sees them: `probe()`, called once by the training side.

`dlm doctor` plans against `dlm.plan.hardware.probe_light()` (no torch); `dlm train` and
`dlm compare` call this instead, so CUDA's device count and MPS come from torch itself.
"""

from __future__ import annotations

import platform

from dlm.plan.hardware import (
    BF16_CPU_FLAGS,
    HardwareFacts,
    bitsandbytes_ok,
    cores,
    cpu_flags,
    installed_peft,
    missing_packages,
    system_memory,
)


def probe() -> HardwareFacts:
    """Ask torch what this machine has. Imports torch (seconds); call once per process."""
    import torch

    n_cores = cores()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cc = (props.major, props.minor)
        return HardwareFacts(
            device="cuda",
            name=props.name,
            memory_bytes=int(props.total_memory),
            cores=n_cores,
            compute_capability=cc,
            device_count=torch.cuda.device_count(),
            native_bf16=cc >= (8, 0),
            bitsandbytes=bitsandbytes_ok(),
            peft_version=installed_peft(),
            missing_packages=missing_packages(),
            torch_version=torch.__version__,
        )
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return HardwareFacts(
            device="mps",
            name=f"Apple {platform.machine()}",
            memory_bytes=system_memory(),
            cores=n_cores,
            native_bf16=True,
            bitsandbytes=False,
            peft_version=installed_peft(),
            missing_packages=missing_packages(),
            torch_version=torch.__version__,
        )
    flags = cpu_flags()
    return HardwareFacts(
        device="cpu",
        name=platform.processor() or platform.machine(),
        memory_bytes=system_memory(),
        cores=n_cores,
        native_bf16=any(f in flags for f in BF16_CPU_FLAGS),
        bitsandbytes=bitsandbytes_ok(),
        peft_version=installed_peft(),
        missing_packages=missing_packages(),
        cpu_flags=flags,
        torch_version=torch.__version__,
    )
