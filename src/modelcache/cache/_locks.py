"""A ref's write lock, waited on as long as its holder makes progress, and part files that a
dead writer left, taken over to resume."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from modelcache._posix import FileLock, writer_alive
from modelcache._transfer import resume_progress
from modelcache.errors import LockTimeoutError, SourceError

from ._names import unique

__all__ = ["claim_part", "lock_or_wait"]

log = logging.getLogger("modelcache")

T = TypeVar("T")
_STALE_LEFTOVER_S = 3600.0


def lock_or_wait(
    lock: FileLock,
    tmp: Path,
    key: str,
    published: Callable[[], T | None],
    *,
    timeout: float,
    cancel: threading.Event | None = None,
) -> T | None:
    """Take ``lock``; or return what ``published()`` finds once another writer publishes.

    Waiting lasts as long as the other writer's part files grow; ``timeout`` seconds without
    progress raise :class:`LockTimeoutError`.
    """
    last_seen: float | None = None
    last_change = time.monotonic()
    while True:
        if lock.acquire(timeout=0.2):
            return None
        if cancel is not None and cancel.is_set():
            raise SourceError("cancelled while waiting for another writer")
        found = published()
        if found is not None:
            return found
        activity = _writer_activity(tmp, key)
        if activity != last_seen:
            last_seen, last_change = activity, time.monotonic()
        elif time.monotonic() - last_change > timeout:
            raise LockTimeoutError(
                f"another process holds the lock on {key[:16]} and made no progress "
                f"for {timeout:.0f}s (lock file {lock.path})"
            )


def _writer_activity(tmp: Path, key: str) -> float:
    latest = 0.0
    for path in tmp.glob(f"{key}.*"):
        with contextlib.suppress(OSError):
            st = path.stat()
            latest = max(latest, st.st_mtime + st.st_size)
    return latest


def claim_part(tmp: Path, prefix: str) -> Path:
    """A part file unique to this writer, taking over the best one a dead writer left."""
    mine = tmp / f"{prefix}.{unique()}.part"
    leftovers = sorted(tmp.glob(f"{prefix}.*.part"), key=resume_progress, reverse=True)
    for leftover in leftovers:
        if resume_progress(leftover) <= 0 or writer_alive(leftover):
            continue
        try:
            os.rename(leftover, mine)
        except OSError:
            continue  # another writer took it
        for state in leftover.parent.glob(f"{leftover.name}.*"):  # its resume records
            with contextlib.suppress(OSError):
                os.rename(state, mine.with_name(mine.name + state.name[len(leftover.name) :]))
        log.info("resuming %s with %d bytes kept", prefix[:16], resume_progress(mine))
        break
    for stale in tmp.glob(f"{prefix}.*"):
        if stale.name.startswith(mine.name):
            continue
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_LEFTOVER_S:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink()
    return mine
