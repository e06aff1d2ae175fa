"""Free space: refuse a download the disk cannot hold before its first byte is fetched."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import InsufficientSpaceError

__all__ = ["ensure_free", "is_disk_full"]

MARGIN = 16 << 20
"""Bytes kept free beyond the download (metadata, other writers' small files)."""


def ensure_free(directory: Path, needed: int) -> None:
    """Raise :class:`InsufficientSpaceError` unless ``directory`` can take ``needed`` more bytes."""
    free = shutil.disk_usage(directory).free
    if needed + MARGIN > free:
        raise InsufficientSpaceError(f"needs {needed} more bytes but {directory} has {free} free")


def is_disk_full(error: OSError) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
