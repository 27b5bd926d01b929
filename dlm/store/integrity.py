"""What makes a stored version trustworthy: complete, finite safetensors and a checksum record.

`check_safetensors` refuses a file that is truncated, padded, malformed or holds NaN/inf floats (the
header is parsed with the stdlib; the values are scanned through a numpy memmap in bounded chunks).
`verify` checks every file of a version folder against `files.json` (size and sha256), which
`dlm.store` writes when it commits the version. Nothing here writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from dlm.errors import RunError

CHECKSUMS = "files.json"
# bytes per element of the safetensors dtypes; finiteness masks for floats numpy cannot name
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
_NUMPY_FLOAT = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
_EXPONENT_MASK = {"BF16": ("<u2", 0x7F80), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F)}


def sha256_file(path: Path, sync: bool = False) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def listed_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file that is truncated, padded, malformed or holds NaN/inf floats."""

    def bad(what: str) -> RunError:
        return RunError(
            f"refusing to keep {path.name}: {what}",
            "the adapter was not saved completely; nothing was switched, train again or `--resume`",
            str(path),
        )

    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise bad(f"the header is cut off ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    tensors, end = [], 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], info["shape"], info["data_offsets"]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise bad(f"tensor {name!r} has invalid data offsets")
        if dtype in _ITEMSIZE and stop - begin != count * _ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r} ({dtype}, shape {shape}) does not match its {stop - begin} bytes")
        tensors.append((name, dtype, begin, stop))
        end = max(end, stop)
    if not tensors:
        raise bad("it holds no tensors")
    if 8 + n + end != size:
        raise bad(f"the header promises {8 + n + end} bytes, the file has {size}")
    try:
        import numpy as np  # lazily: the size checks above need nothing but the stdlib
    except ImportError:
        return
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if end else None
    for name, dtype, begin, stop in tensors:
        if begin == stop or (dtype not in _NUMPY_FLOAT and dtype not in _EXPONENT_MASK):
            continue
        assert data is not None  # a non-empty tensor lies inside the data section
        raw = data[begin:stop]
        step = 1 << 24  # bytes per chunk: bounded memory for large adapters
        for at in range(0, stop - begin, step):
            chunk = raw[at : at + step]
            if dtype in _NUMPY_FLOAT:
                finite = bool(np.isfinite(chunk.view(_NUMPY_FLOAT[dtype])).all())
            else:  # an all-ones exponent (bf16, e5m2) or the e4m3fn NaN pattern
                view, mask = _EXPONENT_MASK[dtype]
                finite = not bool(((chunk.view(view) & mask) == mask).any())
            if not finite:
                raise bad(f"tensor {name!r} holds NaN or infinite values")


def verify(version_dir: Path) -> None:
    """Every file recorded in `files.json` is present with its size and sha256; RunError otherwise."""
    version_dir = Path(version_dir)
    name = version_dir.name

    def damaged(what: str) -> RunError:
        return RunError(
            f"version {name} is damaged: {what}",
            f"{version_dir} cannot be trusted; `dlm train` writes a new version "
            "(earlier versions are untouched and each one is verified on use)",
            str(version_dir),
        )

    if not version_dir.is_dir():
        raise damaged("the folder is missing")
    try:
        record = json.loads((version_dir / CHECKSUMS).read_text("utf-8"))["files"]
    except FileNotFoundError:
        raise damaged(f"{CHECKSUMS}, its checksum record, is missing") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise damaged(f"{CHECKSUMS}, its checksum record, is not valid") from None
    for rel, want in sorted(record.items()):
        path = version_dir / rel
        if not path.is_file():
            raise damaged(f"{rel} is missing")
        if path.stat().st_size != want["bytes"]:
            raise damaged(f"{rel} has {path.stat().st_size} bytes, {want['bytes']} were written")
        if sha256_file(path) != want["sha256"]:
            raise damaged(f"{rel} was modified after it was written (sha256 differs)")
