"""The CPU settings of a plan (`runtime_kwargs` "threads" and "malloc") applied in the training process.

No library takes these as arguments, so `dlm.train.run` applies them itself, before the base loads:

- `threads`: torch's intra-op threads per process (`torch.set_num_threads`). In one process dlm never
  raises torch's own default (it counts physical cores; hyper-threads slow its matmuls) and honours
  a lower OMP_NUM_THREADS; with several processes (torchrun, accelerate) each one gets its share of
  the cores, where torchrun alone would leave OMP_NUM_THREADS=1.
- `malloc: keep-freed`: glibc's `mallopt(M_MMAP_THRESHOLD, 32 MiB)` and `mallopt(M_TRIM_THRESHOLD,
  2 GiB - 1)`. By default glibc serves every block over its (adaptive) mmap threshold with a fresh
  mapping and gives it back on free, and trims the heap top, so the few-MB activation and gradient
  tensors of every step fault in zeroed pages again. With the threshold at its 64-bit maximum and no
  trimming, freed blocks are reused. Blocks over 32 MiB (the logits of a large batch) stay mmapped.
  `make bench` measured x1.07 tokens/s for ~0.2 GiB more peak RSS (the freed blocks stay with the
  process). The settings last for the process; elsewhere than Linux with glibc nothing is changed
  and the event says so.

torch is imported inside `apply` only; the module itself is cheap to import.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Mapping
from typing import Any

from dlm.plan.planner import MALLOC_MMAP as MMAP_THRESHOLD  # the value the plan's reason names

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Apply glibc's mallopt settings above; True when glibc accepted both."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def apply(runtime: Mapping[str, Any], world_size: int = 1) -> dict[str, Any]:
    """Apply the plan's CPU settings; returns what was done: {"threads": n, "malloc": applied}."""
    done: dict[str, Any] = {}
    threads = runtime.get("threads")
    if isinstance(threads, int) and threads >= 1:
        import torch

        current = torch.get_num_threads()
        want = threads if world_size > 1 else min(threads, current)
        if want != current:
            torch.set_num_threads(want)
        done["threads"] = want
    if runtime.get("malloc") == "keep-freed":
        done["malloc"] = keep_freed_memory()
    return done
