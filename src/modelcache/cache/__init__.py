"""The cache: each file's bytes once, by sha256; a ref per source; locked, verified, layered.

See :class:`Cache` and ``docs/cache.md`` for the layout.
"""

from __future__ import annotations

from ._cache import Cache
from ._entries import Entry, Fetched, Problem
from ._layout import LayoutError

__all__ = ["Cache", "Entry", "Fetched", "LayoutError", "Problem"]
