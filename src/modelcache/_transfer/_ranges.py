"""Parallel ranges: workers fetch chunks with ranged requests, the hasher hashes them in order.

Each worker writes its chunk where it belongs as it arrives (recorded in the range map as
written, so a chunk finished beyond a gap survives a kill) and queues its pieces for the hasher.
Chunks ahead of the hashing position wait in memory, and workers may run at most
``connections`` chunks ahead of it, which bounds memory to about ``connections * chunk_size``.
Between chunks the hasher reads back from disk the ranges an earlier attempt kept.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from modelcache._retry import RetryBudget, TransientError

from ._part import Part, handed_over
from ._reader import RangeStream, Reader, close_quietly

__all__ = ["OriginChanged", "RangesRefused", "fetch_ranges"]

Chunk = tuple[int, int | None]


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
        self._count = count
        self.window = window
        self._next = 1  # chunk 0 is the first worker's
        self._hashed = 0
        self._cond = threading.Condition()
        self.abort = threading.Event()

    def take(self) -> int | None:
        with self._cond:
            while not self.abort.is_set():
                index = self._next
                if index >= self._count:
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

    def stop(self) -> None:
        self.abort.set()
        with self._cond:
            self._cond.notify_all()


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
) -> None:
    """Fetch ``chunks`` with parallel workers, hashed in order; ``first``: the first's response.

    The chunks must be missing ranges in file order; the bytes between them must be written
    already (they are hashed from disk). ``part.ranges`` holds the version expected.
    """
    limit = -(-chunk_size // piece_size) + 1
    queues = [_Pieces(limit) for _ in chunks]
    plan = _Plan(len(chunks), max(1, connections))

    def work(stream: RangeStream | None, index: int | None) -> None:
        while index is not None and not plan.abort.is_set():
            _fetch_chunk(part, reader, chunks[index], stream, queues[index], plan.abort, budget)
            stream = None
            index = plan.take()

    workers = [threading.Thread(target=work, args=(first, 0), daemon=True, name="modelcache-0")]
    workers += [
        threading.Thread(target=work, args=(None, plan.take()), daemon=True, name=f"modelcache-{n}")
        for n in range(1, min(plan.window, len(chunks)))
    ]
    for worker in workers:
        worker.start()
    try:
        for index, (start, _) in enumerate(chunks):
            part.hash_kept(start)
            while (item := handed_over(queues[index].get, part.cancel)) is not _STOP:
                part.hash(item)
            plan.hashed(index + 1)
    finally:
        plan.stop()
        close_quietly(first)
        for worker in workers:
            worker.join()


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
