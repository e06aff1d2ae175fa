"""A ``.safetensors`` file as tensors over one private memory mapping of the whole file.

``safetensors.torch.load_file`` reads every tensor's pages while loading; mapping the file once
(``torch.UntypedStorage.from_file``, copy-on-write like ``load_file``'s own mapping) and making
each tensor a view of it reads nothing until a page is used, and lets the kernel read ahead in
big sequential runs when the pages are then mapped in order (:mod:`modelcache._prefault`).
Anything this reader does not know (a dtype, an unaligned offset, an inconsistent header)
returns ``None`` so the caller uses ``load_file``, which also reports broken files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

__all__ = ["map_safetensors"]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def _dtypes() -> dict[str, Any]:
    import torch

    names = {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U8": "uint8",
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }
    return {key: getattr(torch, name) for key, name in names.items() if hasattr(torch, name)}


def _header(path: Path) -> tuple[dict[str, Any], int] | None:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            return None
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return None
    return (header, 8 + length) if isinstance(header, dict) else None


def map_safetensors(path: Path) -> dict[str, Any] | None:
    """``path``'s tensors (CPU) as views of one copy-on-write mapping; ``None`` if unsure."""
    import torch

    found = _header(path)
    if found is None:
        return None
    header, base = found
    size = os.path.getsize(path)
    dtypes = _dtypes()
    plan = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[info["dtype"]]
            shape = [int(n) for n in info["shape"]]
            start, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (
            not 0 <= start <= end <= size - base
            or end - start != math.prod(shape) * itemsize
            or (base + start) % itemsize
        ):
            return None
        plan.append((name, dtype, shape, (base + start) // itemsize))
    if size == 0:
        return None
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    state: dict[str, Any] = {}
    for name, dtype, shape, offset in plan:
        tensor = torch.empty(0, dtype=dtype)
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        tensor.set_(storage, offset, shape, strides)  # type: ignore[arg-type]
        state[name] = tensor
    return state
