"""How many handles of this process serve each cached file, and giving the cache's lease back.

The cache's lease on an entry is per process: the last handle to let go of a file gives the
lease back, so unloading one of two handles on the same entry never lets prune evict it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelcache.cache import Cache

__all__ = ["hold", "let_go"]

_counts: dict[Path, int] = {}
_lock = threading.Lock()


def hold(path: Path) -> None:
    """One more handle of this process serves ``path``."""
    with _lock:
        _counts[path] = _counts.get(path, 0) + 1


def let_go(cache: Cache, path: Path, key: str | None) -> None:
    """One handle no longer serves ``path``; the last one lets ``cache`` evict its entry ``key``
    again (``None``: a file used in place, which the cache does not own)."""
    with _lock:
        left = _counts.get(path, 0) - 1
        if left > 0:
            _counts[path] = left
            return
        _counts.pop(path, None)
    if key is not None:
        cache.release(key)
