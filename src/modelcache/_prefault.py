"""Map a loaded file's pages into the process in one call, instead of one page fault per page.

A memory-mapped state dict costs nothing until its pages are read; then every 4 KiB page is a
page fault. ``madvise(MADV_POPULATE_READ)`` (Linux 5.14+) maps them all from the page cache in a
single system call, reading from disk what is not cached yet, without copying anything (the pages
stay shared with the page cache: no anonymous memory). On older kernels or other systems it
falls back to ``MADV_WILLNEED`` (asynchronous readahead), and where neither exists it does
nothing: the tensors are the same either way, only the first reads are slower.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["populate"]

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22


def _madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_MADVISE = _madvise()


def _spans(tensors: Iterable[Any]) -> list[tuple[int, int]]:
    """The page-aligned ``(address, length)`` of each distinct CPU storage behind ``tensors``."""
    page = mmap.PAGESIZE
    seen: dict[int, int] = {}
    for tensor in tensors:
        if getattr(tensor, "device", None) is None or tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        address, length = storage.data_ptr(), storage.nbytes()
        if address and length:
            seen[address] = max(seen.get(address, 0), length)
    spans = []
    for address, length in seen.items():
        start = address - address % page
        spans.append((start, -(-(address + length - start) // page) * page))
    return spans


def populate(tensors: Iterable[Any]) -> bool:
    """Map every page of the tensors' (memory-mapped) storages now; ``True`` if the kernel did.

    Errors are never raised: a kernel without ``MADV_POPULATE_READ`` gets ``MADV_WILLNEED``.
    """
    if _MADVISE is None:
        return False
    done = True
    for address, length in _spans(tensors):
        if _MADVISE(address, length, MADV_POPULATE_READ) != 0:
            done = False
            _MADVISE(address, length, MADV_WILLNEED)
    return done
