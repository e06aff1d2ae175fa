"""Parallel ranges: workers fetch chunks with ranged requests, the hasher hashes them in order.

Each worker writes its chunk where it belongs as it arrives (recorded in the range map as
written, so a chunk finished beyond a gap survives a kill) and queues its pieces for the hasher.
Chunks ahead of the hashing position wait in memory, and workers may run at most as many
chunks ahead of it as there are workers, which bounds memory to about
``connections * chunk_size``. Between chunks the hasher reads back from disk the ranges an
earlier attempt kept.

How many workers run is measured, not fixed (:class:`_Growth`): a pass starts with a few, and
doubles them while the total rate still rises (origins that cap each connection need as many
as the link holds caps: 12 at 20 MiB/s on a 2 Gbit/s link), up to ``connections``. When the
first workers together are no faster than the one stream that measured the origin, parallel
ranges do not help there (the link, the origin or the CPU is the limit, not a per-connection
cap): the pass stops handing out chunks and the engine reads the rest as one stream.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from modelcache._retry import RetryBudget, TransientError

from ._part import Part, handed_over
from ._reader import RangeStream, Reader, close_quietly

__all__ = ["OriginChanged", "RangesRefused", "fetch_ranges"]

Chunk = tuple[int, int | None]

#: workers a parallel pass starts with (then doubled while the total rate rises)
START_WORKERS = 8
_GAIN = 1.25  # a doubling is kept growing only when the total rate rose at least this much
_SETTLE = 0.3  # seconds a worker count runs before its rate is judged


class OriginChanged(TransientError):
    """The origin now serves another version of the file: start again from byte 0."""


class RangesRefused(TransientError):
    """A ranged request got the whole file: read the rest as one stream."""


class _Stop:
    """End-of-chunk marker in a chunk's queue."""


_STOP = _Stop()


class _Pieces:
    """One chunk's pieces on their way to the hasher; at most ``limit`` wait at a time.

    A worker that gets that far ahead of the hasher waits (and stops reading its socket), so
    memory stays bounded even when the hasher cannot keep up.
    """

    def __init__(self, limit: int) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = threading.Semaphore(limit)

    def put(self, piece: bytes, abort: threading.Event) -> bool:
        """Queue a piece once there is room; False when the download is aborted meanwhile."""
        while not self._room.acquire(timeout=0.25):
            if abort.is_set():
                return False
        self._queue.put(piece)
        return True

    def signal(self, item: Any) -> None:
        """Queue the end marker or an error (never waits)."""
        self._queue.put(item)

    def get(self, timeout: float) -> Any:
        """The next item; raises ``queue.Empty`` after ``timeout`` seconds."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, bytes):
            self._room.release()
        return item


class _Plan:
    """Which chunk each worker takes next: never more than ``window`` ahead of the hasher."""

    def __init__(self, count: int, window: int) -> None:
        self.count = count
        self.window = window
        self._next = 1  # chunk 0 is the first worker's
        self._hashed = 0
        self._cond = threading.Condition()
        self.abort = threading.Event()

    def take(self) -> int | None:
        with self._cond:
            while not self.abort.is_set():
                index = self._next
                if index >= self.count:
                    return None
                if index < self._hashed + self.window:
                    self._next = index + 1
                    return index
                self._cond.wait(0.5)
            return None

    def hashed(self, count: int) -> None:
        with self._cond:
            self._hashed = count
            self._cond.notify_all()

    def widen(self, window: int) -> None:
        """Let workers run ``window`` chunks ahead of the hasher (fewer: the extra ones wait)."""
        with self._cond:
            self.window = window
            self._cond.notify_all()

    def close(self) -> int:
        """Hand out no more chunks; how many were handed out (the hasher hashes those)."""
        with self._cond:
            self.count = min(self.count, self._next)
            self._cond.notify_all()
            return self.count

    def stop(self) -> None:
        self.abort.set()
        with self._cond:
            self._cond.notify_all()


class _Growth:
    """How many workers a pass runs: doubled while the total rate still rises.

    ``baseline``: the rate of the one stream that measured the origin (``None``: not measured).
    Workers that together do not beat it by :data:`_GAIN` mean parallel ranges do not help.
    """

    def __init__(
        self, start: int, limit: int, baseline: float | None, fetched: Callable[[], int]
    ) -> None:
        self.workers = max(1, min(start, limit))
        self.limit = limit
        self.best = baseline
        self.futile = False  # the first workers were no faster than one stream
        self._fetched = fetched
        self._settled = self.workers >= limit and baseline is None
        self._before: int | None = None  # the count before the last doubling
        self._mark = (time.monotonic(), fetched())

    def check(self) -> int | None:
        """The new worker count when it changes, else ``None`` (the hasher calls it)."""
        if self._settled:
            return None
        now, got = time.monotonic(), self._fetched()
        began, before = self._mark
        if now - began < _SETTLE:
            return None
        rate = (got - before) / (now - began)
        if self.best is not None and rate < self.best * _GAIN:
            self._settled = True  # the last doubling did not pay: back to the count before it
            self.futile = self._before is None
            if self._before is None:
                return None
            self.workers = self._before
            return self.workers
        self.best = rate
        if self.workers >= self.limit:
            self._settled = True
            return None
        self._before = self.workers
        self.workers = min(self.limit, self.workers * 2)
        self._mark = (now, got)
        return self.workers


def fetch_ranges(
    part: Part,
    reader: Reader,
    first: RangeStream | None,
    chunks: list[Chunk],
    *,
    connections: int,
    chunk_size: int,
    piece_size: int,
    budget: RetryBudget,
    start: int = START_WORKERS,
    baseline: float | None = None,
) -> int:
    """Fetch ``chunks`` with parallel workers, hashed in order; ``first``: the first's response.

    The chunks must be missing ranges in file order; the bytes between them must be written
    already (they are hashed from disk). ``part.ranges`` holds the version expected. Starts
    with ``start`` workers, at most ``connections`` (see :class:`_Growth` for ``baseline``).
    Returns the number of workers it settled on, or 0 when parallel ranges proved no faster
    than one stream: then it stopped early, and the chunks not handed out are still missing.
    """
    limit = -(-chunk_size // piece_size) + 1
    queues = [_Pieces(limit) for _ in chunks]
    growth = _Growth(start, max(1, connections), baseline, lambda: part.fetched)
    plan = _Plan(len(chunks), growth.workers)

    def work(stream: RangeStream | None, index: int | None) -> None:
        if index is None:
            index = plan.take()
        while index is not None and not plan.abort.is_set():
            _fetch_chunk(part, reader, chunks[index], stream, queues[index], plan.abort, budget)
            stream = None
            index = plan.take()

    workers: list[threading.Thread] = []

    def hire(count: int) -> None:
        while len(workers) < min(count, len(chunks)):
            n = len(workers)
            args = (first, 0) if n == 0 else (None, None)  # the others take their own chunks
            worker = threading.Thread(target=work, args=args, daemon=True, name=f"modelcache-{n}")
            workers.append(worker)
            worker.start()

    hire(growth.workers)
    try:
        index = 0
        while index < plan.count:
            part.hash_kept(chunks[index][0])
            while (item := handed_over(queues[index].get, part.cancel)) is not _STOP:
                part.hash(item)
            index += 1
            plan.hashed(index)
            changed = growth.check()
            if changed is not None:  # more workers, or back to fewer chunks at once
                plan.widen(changed)
                hire(changed)
            elif growth.futile and plan.count == len(chunks):
                plan.close()  # one stream is as fast here: the engine reads the rest that way
    finally:
        plan.stop()
        close_quietly(first)
        for worker in workers:
            worker.join()
    return 0 if growth.futile else growth.workers


def _fetch_chunk(
    part: Part,
    reader: Reader,
    bounds: Chunk,
    stream: RangeStream | None,
    out: _Pieces,
    abort: threading.Event,
    budget: RetryBudget,
) -> None:
    """Stream one chunk into the file and the queue, retrying from where it stopped."""
    position, end = bounds
    etag, size = part.ranges.etag, part.ranges.size
    try:
        while True:
            try:
                if stream is None:
                    stream = reader.open(position, end, etag)
                    changed = etag is not None and stream.etag not in (None, etag)
                    if not stream.ranged and not changed:
                        raise RangesRefused("the origin ignored a range; one stream now")
                    if stream.start != position or changed:
                        raise OriginChanged("the file changed at the origin; starting again")
                for piece in stream.pieces:
                    if abort.is_set() or part.cancel.is_set():
                        return
                    if end is not None and position + len(piece) > end:
                        piece = piece[: end - position]
                    position = part.store(piece, position)
                    if not out.put(piece, abort):
                        return
                    budget.progressed()
                    if end is not None and position >= end:
                        break
                if end is not None and position < end and size is not None:
                    raise TransientError(f"connection closed at byte {position} of {end}")
                # (a clean end before ``end`` when the size is unknown is the end of file)
                out.signal(_STOP)
                return
            except TransientError as error:
                if end is None or isinstance(error, (OriginChanged, RangesRefused)):
                    raise  # a single stream (or a new version) is retried by the outer loop
                close_quietly(stream)
                stream = None
                budget.wait(error)
            finally:
                close_quietly(stream)
                stream = None
    except BaseException as error:  # handed to the hashing thread, which raises it
        out.signal(error)
