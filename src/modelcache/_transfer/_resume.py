"""The range map: which byte ranges of a part file are written, kept beside it for resume.

``<part>.json`` records the ranges already written, in whatever order they finished (parallel
ranges finish out of order), the origin's size and validator (its ``ETag``, else
``Last-Modified``), and the boot it was written in::

    {"format": 2, "size": 16777216, "etag": "\\"5f-6a1\\"", "boot": "3f0c...",
     "done": [[0, 6291456], [8388608, 10485760]]}

It is replaced atomically (a temporary file, then ``os.replace``), so whoever reads it sees the
previous map or the next one, never half of one. A range is recorded (in memory) only after its
bytes were written to the part file (``pwrite`` returned); a timer writes the map every
:data:`SAVE_EVERY` seconds when it changed (:func:`saving`), and the engine writes it when a pass
over the file ends. A download killed at any point, ``SIGKILL`` included, loses at most that
fraction of a second of work: a killed process's written bytes stay in the page cache.

Power loss is not covered: nothing is ``fsync``-ed, so the map may reach the disk before the
bytes it vouches for. A map written before the machine last booted therefore counts as empty
(the download starts again from byte 0) rather than vouch for bytes that may be lost. So does a
map that cannot be read (missing, truncated, corrupt, of another format) or that names bytes
past the part file's end.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "SAVE_EVERY",
    "RangeMap",
    "discard_part",
    "read_resume_state",
    "resume_progress",
    "saving",
]

#: seconds between two writes of a map while its download runs
SAVE_EVERY = 0.25
_FORMAT = 2


def map_path(part: Path) -> Path:
    """Where the range map of ``part`` lives."""
    return part.with_name(part.name + ".json")


def _temp_path(part: Path) -> Path:
    return part.with_name(part.name + ".json.tmp")


@functools.lru_cache(maxsize=1)
def _boot_id() -> str | None:
    """This boot's id (Linux), or None where the system does not tell."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class RangeMap:
    """The written ranges of one part file, with the origin's size and validator.

    Thread-safe: every writer thread records the ranges it wrote with :meth:`add`.
    """

    def __init__(self, part: Path, size: int | None = None, etag: str | None = None) -> None:
        self.part = part
        self.size = size
        self.etag = etag
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._total = 0
        self._lock = threading.Lock()
        self._changed = False

    @classmethod
    def load(cls, part: Path) -> RangeMap:
        """The map recorded beside ``part``; an empty one when there is none worth trusting."""
        try:
            raw = json.loads(map_path(part).read_text())
            boot = raw.get("boot")
            if raw["format"] != _FORMAT or (boot and _boot_id() and boot != _boot_id()):
                return cls(part)
            size, etag = raw["size"], raw["etag"]
            if not (size is None or (isinstance(size, int) and size >= 0)):
                return cls(part)
            if not (etag is None or isinstance(etag, str)):
                return cls(part)
            on_disk = part.stat().st_size
            loaded = cls(part, size, etag)
            for start, end in raw["done"]:
                if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end):
                    return cls(part)
                if end > on_disk or (size is not None and end > size):
                    return cls(part)
                loaded._add(start, end)
            return loaded
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(part)

    # -- reading ------------------------------------------------------------------------------

    @property
    def done(self) -> int:
        """Bytes recorded as written."""
        return self._total

    @property
    def extent(self) -> int:
        """Where the last written range ends (0 when none is)."""
        with self._lock:
            return self._ends[-1] if self._ends else 0

    def ranges(self) -> list[tuple[int, int]]:
        """The written ranges ``[start, end)``, sorted, none touching another."""
        with self._lock:
            return list(zip(self._starts, self._ends, strict=True))

    def covers(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` is recorded as written."""
        if start >= end:
            return True
        with self._lock:
            index = bisect.bisect_right(self._starts, start) - 1
            return index >= 0 and self._ends[index] >= end

    def reach(self, position: int) -> int:
        """Where the written bytes from ``position`` on end (``position`` when it is not)."""
        with self._lock:
            index = bisect.bisect_right(self._starts, position) - 1
            return max(position, self._ends[index]) if index >= 0 else position

    def gaps(self, start: int, end: int | None) -> list[tuple[int, int | None]]:
        """The ranges of ``[start, end)`` not written yet (``end=None``: the file's end unknown,
        the last gap is open-ended)."""
        missing: list[tuple[int, int | None]] = []
        position = start
        for first, last in self.ranges():
            if last <= position:
                continue
            if end is not None and first >= end:
                break
            if first > position:
                missing.append((position, first))
            position = last
        if end is None:
            missing.append((position, None))
        elif position < end:
            missing.append((position, end))
        return missing

    # -- recording ----------------------------------------------------------------------------

    def add(self, start: int, end: int) -> None:
        """Record ``[start, end)`` as written (call only once ``pwrite`` returned)."""
        with self._lock:
            self._add(start, end)
            self._changed = True

    def _add(self, start: int, end: int) -> None:
        if start >= end:
            return
        low = bisect.bisect_left(self._ends, start)  # the first range touching or after it
        high = bisect.bisect_right(self._starts, end)  # past the last range touching it
        if low < high:  # merge with the ranges it touches
            start = min(start, self._starts[low])
            end = max(end, self._ends[high - 1])
            self._total -= sum(self._ends[i] - self._starts[i] for i in range(low, high))
            del self._starts[low:high], self._ends[low:high]
        self._starts.insert(low, start)
        self._ends.insert(low, end)
        self._total += end - start

    def clear(self) -> None:
        """Forget every range, the size and the validator (the file changed), and save."""
        with self._lock:
            self._starts.clear()
            self._ends.clear()
            self._total = 0
            self.size = self.etag = None
            self._save()

    def save(self) -> None:
        """Write the map beside the part file, atomically."""
        with self._lock:
            self._save()

    def flush(self) -> None:
        """Write the map if a range was recorded since it was last written."""
        with self._lock:
            if self._changed:
                self._save()

    def _save(self) -> None:
        record = {
            "format": _FORMAT,
            "size": self.size,
            "etag": self.etag,
            "boot": _boot_id(),
            "done": [[s, e] for s, e in zip(self._starts, self._ends, strict=True)],
        }
        temp = _temp_path(self.part)
        temp.write_text(json.dumps(record, separators=(",", ":")))
        os.replace(temp, map_path(self.part))
        self._changed = False


@contextlib.contextmanager
def saving(ranges: RangeMap) -> Iterator[None]:
    """Write ``ranges`` every :data:`SAVE_EVERY` seconds while the block runs (when changed).

    A timer rather than the writers: a download whose connections stall still has its last
    progress on disk within that time.
    """
    stop = threading.Event()

    def flush_now_and_then() -> None:
        while not stop.wait(SAVE_EVERY):
            with contextlib.suppress(OSError):  # the next write tries again; the engine's raises
                ranges.flush()

    timer = threading.Thread(target=flush_now_and_then, daemon=True, name="modelcache-map")
    timer.start()
    try:
        yield
    finally:
        stop.set()
        timer.join()


def resume_progress(part: Path) -> int:
    """Bytes of ``part`` its range map records as written (0 when there is none to trust)."""
    return RangeMap.load(part).done


def read_resume_state(part: Path) -> tuple[int, str | None, int | None]:
    """``(bytes written, etag, size)`` recorded for a part file; ``(0, None, None)`` when none."""
    state = RangeMap.load(part)
    return state.done, state.etag, state.size


def discard_part(part: Path) -> None:
    """Remove a part file and its range map."""
    for path in (part, map_path(part), _temp_path(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
