"""The local side of a download: the part file, its range map, and the in-order sha256.

Writer threads (one stream's reader, or the workers of parallel ranges) put the bytes they
fetch where they belong with :meth:`Part.store`, which records them in the range map once
written. One thread, the hasher, feeds the sha256 in file order: fresh bytes as the writers hand
them over (:meth:`Part.hash`), and bytes kept from an earlier attempt by reading them back from
disk once it reaches them (:meth:`Part.hash_kept`). So a download resumed over gaps still
hashes its file once, in order, and reads from disk only what it did not fetch this time.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from modelcache._retry import Cancelled

from ._options import MiB
from ._resume import RangeMap

__all__ = ["Part", "Progress", "handed_over"]

Progress = Callable[[int, "int | None"], None]
"""A progress callback: ``(bytes_done, bytes_total_or_None)``."""

_READ_BACK = 8 * MiB  # bytes read from disk at a time to hash kept ranges


class Part:
    """An open part file being filled, with its range map and in-order hash."""

    def __init__(
        self, fd: int, ranges: RangeMap, progress: Progress | None, cancel: threading.Event
    ) -> None:
        self.fd = fd
        self.ranges = ranges
        self.progress = progress
        self.cancel = cancel
        self.hasher = hashlib.sha256()
        #: bytes hashed so far, all from the start of the file in order
        self.hashed = 0
        #: bytes fetched from the origin by this process
        self.fetched = 0
        self._fetched_lock = threading.Lock()

    def store(self, data: bytes | memoryview, position: int) -> int:
        """Write fetched bytes where they belong and record them (any thread); where they end."""
        view = memoryview(data)
        offset = position
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written
        self.ranges.add(position, offset)  # only once written: what the map says is on disk
        with self._fetched_lock:
            self.fetched += offset - position
        return offset

    def hash(self, data: bytes | memoryview) -> None:
        """Hash the next bytes of the file (the hasher thread only)."""
        self.hasher.update(data)
        self.hashed += len(data)
        self.report()

    def hash_kept(self, upto: int) -> None:
        """Hash ``[hashed, upto)`` from disk: bytes written earlier (the hasher thread only)."""
        if upto <= self.hashed:
            return
        if not self.ranges.covers(self.hashed, upto):
            raise RuntimeError(f"bytes {self.hashed}-{upto} were never written")  # a bug
        while self.hashed < upto:
            if self.cancel.is_set():
                raise Cancelled
            data = os.pread(self.fd, min(_READ_BACK, upto - self.hashed), self.hashed)
            if not data:
                raise OSError("the part file shrank while resuming")
            self.hash(data)

    def restart(self) -> None:
        """Forget everything written (another version of the file): start again at byte 0."""
        self.ranges.clear()
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.ranges.done, self.ranges.size)


def handed_over(
    get: Callable[[float], Any],
    cancel: threading.Event,
    *,
    every: float = 0.25,
    idle: Callable[[], None] | None = None,
) -> Any:
    """The next item a writer thread hands to the hasher; raises the errors it hands over.

    ``idle`` is called each time nothing came for ``every`` seconds.
    """
    while True:
        try:
            item = get(every)
        except queue.Empty:
            if cancel.is_set():
                raise Cancelled from None
            if idle is not None:
                idle()
            continue
        if isinstance(item, BaseException):
            raise item
        return item
