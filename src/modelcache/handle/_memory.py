"""Memory a handle gives back: the process's resident size, and freeing after an unload."""

from __future__ import annotations

import gc
import os

__all__ = ["free_memory", "human", "rss"]


def rss() -> int | None:
    """This process's resident set size in bytes (Linux), or ``None``."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def free_memory(before: int | None, *, collect: bool = True) -> int | None:
    """Collect garbage and give freed heap back to the OS; the resident bytes released since
    ``before`` (measured while the model was still referenced)."""
    if collect:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    after = rss()
    if before is None or after is None:
        return None
    return max(0, before - after)


def human(size: int | None) -> str:
    """``size`` bytes as ``"1.5 MiB"`` (``"unknown"`` for ``None``)."""
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
