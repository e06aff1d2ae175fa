"""POSIX advisory locks: one probe that reads their errors, write locks, leases, part ownership.

Only ``EACCES``, ``EAGAIN`` and ``EWOULDBLOCK`` mean that another process holds a lock (as
filelock reads them). Any other error (``ENOLCK`` on some NFS mounts, ``ENOSYS``/``EOPNOTSUPP`` on
FUSE filesystems) means the filesystem cannot lock: modelcache then stays correct, because
writers publish with an atomic rename after verifying, and only loses its guard against
duplicate downloads and its view of which entries other processes use.

``flock`` locks belong to an open file description, so two threads of one process that each
open the lock file exclude each other too.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

__all__ = ["FileLock", "Leases", "Probe", "probe_lock", "writer_alive"]

log = logging.getLogger("modelcache")

_IN_USE = frozenset({errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK})
_POLL_S = 0.05
_STALE_S = 60.0
"""Without working locks, a part file untouched this long is taken to be a dead writer's."""


class Probe(enum.Enum):
    """What a non-blocking lock attempt found."""

    TAKEN = "taken"
    BUSY = "busy"
    UNSUPPORTED = "unsupported"


def flock(fd: int, operation: int) -> None:
    """``fcntl.flock``: the one place modelcache calls it (tests make it fail like NFS does)."""
    fcntl.flock(fd, operation)


_warned: set[int] = set()


def probe_lock(fd: int, *, shared: bool = False) -> Probe:
    """Try to take a lock on ``fd`` without waiting."""
    try:
        flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in _IN_USE:
            return Probe.BUSY
        if error.errno not in _warned:
            _warned.add(error.errno or 0)
            log.debug("file locks do not work here (%s): no guard against duplicate work", error)
        return Probe.UNSUPPORTED
    return Probe.TAKEN


class FileLock:
    """An exclusive lock on ``path``, taken by polling; also excludes other threads.

    When the filesystem cannot lock, :meth:`acquire` succeeds at once (see the module doc).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        """Take the lock within ``timeout`` seconds (0: one try); False when another holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        deadline = time.monotonic() + timeout
        while True:
            if probe_lock(fd) is not Probe.BUSY:
                self._fd = fd
                return True
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(_POLL_S)

    def release(self) -> None:
        """Give the lock back (closing the file drops it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class Leases:
    """Shared locks that mark entries as used by this process, one per lease file.

    A process holds each lease once, however many callers use the entry; an evictor takes the
    lease file's exclusive lock, which fails while any process holds it shared.
    """

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, path: Path) -> bool:
        """Hold ``path`` shared; False when an evictor holds it (the entry is going away)."""
        with self._lock:
            if str(path) in self._held:
                return True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
            except OSError:
                return True  # a cache that cannot hold lock files cannot coordinate eviction
            if probe_lock(fd, shared=True) is Probe.BUSY:
                os.close(fd)
                return False
            self._held[str(path)] = fd
            return True

    def give_back(self, path: Path) -> None:
        """Stop holding ``path``."""
        with self._lock:
            fd = self._held.pop(str(path), None)
        if fd is not None:
            os.close(fd)

    def give_back_all(self) -> None:
        """Stop holding every lease (a test's end, a process about to exec)."""
        with self._lock:
            fds = list(self._held.values())
            self._held.clear()
        for fd in fds:
            os.close(fd)

    def holds(self, path: Path) -> bool:
        """Whether this process holds ``path``."""
        with self._lock:
            return str(path) in self._held


def writer_alive(part: Path) -> bool:
    """Whether a living writer still owns ``part`` (it keeps an exclusive lock on it)."""
    try:
        fd = os.open(part, os.O_RDONLY)
    except OSError:
        return True
    try:
        found = probe_lock(fd)
    finally:
        os.close(fd)  # closing drops the probe's own lock
    if found is Probe.UNSUPPORTED:
        try:
            return time.time() - part.stat().st_mtime < _STALE_S
        except OSError:
            return True
    return found is Probe.BUSY
