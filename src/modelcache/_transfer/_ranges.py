"""Parallel ranges: workers fetch chunks with ranged requests, the hasher hashes them in order.

Each worker writes its chunk where it belongs as it arrives and records it in the range map
(so a chunk finished beyond a gap survives a kill). The hasher follows the written bytes in
file order and hashes them back from the page cache, so a slow chunk holds back the hash but
not the other workers: they may run up to :data:`AHEAD` bytes past the hashing position (or
two chunks per connection, when more), which bounds the page cache a download dirties ahead of
its hash, not its memory (each worker has one buffer). Bytes an earlier attempt kept are
hashed the same way when the hasher reaches them.

How many workers run is measured, not fixed (:class:`_Growth`): a pass starts with a few, and
doubles them while the total rate still rises (origins that cap each connection need as many
as the link holds caps: 12 at 20 MiB/s on a 2 Gbit/s link), up to ``connections``. When the
first workers together are no faster than the one stream that measured the origin, one worker
is measured alone: as fast as they were, parallel ranges do not help there (the link, the
origin or the CPU is the limit, not a per-connection cap), and the pass stops handing out
chunks for the engine to read the rest as one stream; slower, a burst had carried that
stream's first bytes, and the workers grow on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from modelcache._retry import Cancelled, RetryBudget, TransientError

from ._options import MiB
from ._part import Part
from ._reader import RangeStream, Reader, close_quietly

__all__ = ["AHEAD", "OriginChanged", "RangesRefused", "fetch_ranges"]

Chunk = tuple[int, int]

#: workers a parallel pass starts with (then doubled while the total rate rises)
START_WORKERS = 8
#: bytes workers may fetch past the hashing position (at least two chunks per connection)
AHEAD = 256 * MiB
_SETTLE = 0.3  # seconds a worker count runs before its rate is judged


class OriginChanged(TransientError):
    """The origin now serves another version of the file: start again from byte 0."""


class RangesRefused(TransientError):
    """A ranged request got the whole file: read the rest as one stream."""


class _Plan:
    """Which chunk a worker takes next: only the first ``workers`` workers take chunks, and
    only chunks that start less than ``ahead`` bytes past the hashing position."""

    def __init__(self, chunks: list[Chunk], workers: int, ahead: int) -> None:
        self.chunks = chunks
        self.count = len(chunks)
        self.workers = workers
        self.ahead = ahead
        self._next = 1  # chunk 0 is the first worker's
        self._hashed = chunks[0][0]
        self._cond = threading.Condition()
        self.abort = threading.Event()

    def take(self, worker: int) -> int | None:
        """The next chunk for ``worker`` (waiting while it may not take one); None: no more."""
        with self._cond:
            while not self.abort.is_set():
                index = self._next
                if index >= self.count:
                    return None
                if worker < self.workers and self.chunks[index][0] < self._hashed + self.ahead:
                    self._next = index + 1
                    return index
                self._cond.wait(0.5)
            return None

    def hashed(self, position: int) -> None:
        """The hasher reached ``position``: workers may take chunks up to ``ahead`` past it."""
        with self._cond:
            self._hashed = position
            self._cond.notify_all()

    def resize(self, workers: int) -> None:
        """Let the first ``workers`` workers take chunks (the others wait)."""
        with self._cond:
            self.workers = workers
            self._cond.notify_all()

    def close(self) -> None:
        """Hand out no more chunks (the hasher hashes those handed out)."""
        with self._cond:
            self.count = min(self.count, self._next)
            self._cond.notify_all()

    def stop(self) -> None:
        self.abort.set()
        with self._cond:
            self._cond.notify_all()


class _Growth:
    """How many workers a pass runs: doubled while the total rate still rises.

    ``baseline``: the rate of the one stream that measured the origin (``None``: not measured).
    More workers are kept only when they fetch a quarter of their proportional gain more than
    the fewer did (1.25x for a doubling, :func:`_worth`). When the first workers do not so beat
    the one stream, one worker is measured before the pass gives up on parallel ranges: a burst
    (the socket buffers' first bytes, a token bucket) may have carried that stream's first bytes
    and made its rate look higher than a capped connection's. Parallel ranges do not help only
    when one worker is nearly as fast as the first workers were.
    """

    def __init__(
        self, start: int, limit: int, baseline: float | None, fetched: Callable[[], int]
    ) -> None:
        self.workers = max(1, min(start, limit))
        self.limit = limit
        self.futile = False  # one worker was as fast as the first workers: parallel does not help
        self._fetched = fetched
        self._baseline = baseline
        self._best: tuple[float, int] | None = None  # the best rate measured, and its workers
        #: the first workers' rate and count, when it fell short of the baseline (one worker
        #: is measured next, once the others finished the chunks they had)
        self._short: tuple[float, int] | None = None
        self._alone = False  # whether the other workers have finished their chunks
        self._settled = self.workers >= limit and baseline is None
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
        self._mark = (now, got)
        if self._short is not None and not self._alone:
            self._alone = True  # the others finished their chunks: one worker is timed from now
            return None
        if self._short is not None:  # ``rate`` is one worker's
            best, self._short = self._short, None
            if best[0] < rate * _worth(1, best[1]):
                self.futile = self._settled = True  # the link, not a cap, is the limit
                return None
            self._best = best  # the first measure was carried by a burst: parallel it is
            return self._next(best[1])
        if self._best is None:  # the first workers
            if self._baseline is not None and rate < self._baseline * _worth(1, self.workers):
                if self.workers == 1:
                    self.futile = self._settled = True
                    return None
                self._short = (rate, self.workers)
                self.workers = 1
                return self.workers
            self._best = (rate, self.workers)
            return self._next(self.workers)
        if rate < self._best[0] * _worth(self._best[1], self.workers):
            self._settled = True  # the last step did not pay: back to the count before it
            self.workers = self._best[1]
            return self.workers
        self._best = (rate, self.workers)
        return self._next(self.workers)

    def _next(self, workers: int) -> int:
        """Double ``workers`` (the count now kept), or settle there at the limit."""
        self._settled = workers >= self.limit
        self.workers = min(self.limit, workers * 2)
        return self.workers


def _worth(before: int, after: int) -> float:
    """How many times the rate of ``before`` workers ``after`` must reach to be kept."""
    return 1 + (after / before - 1) / 4


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
    growth = _Growth(start, max(1, connections), baseline, lambda: part.fetched)
    plan = _Plan(chunks, growth.workers, max(AHEAD, 2 * connections * chunk_size))
    written = threading.Condition()  # a worker wrote bytes, or failed
    failed: list[BaseException] = []

    def wrote() -> None:
        with written:
            written.notify()

    def work(worker: int, stream: RangeStream | None) -> None:
        buffer = bytearray(piece_size)
        index = 0 if worker == 0 else plan.take(worker)  # chunk 0 is the first worker's
        try:
            while index is not None and not plan.abort.is_set():
                _fetch_chunk(part, reader, chunks[index], stream, buffer, plan.abort, budget, wrote)
                stream = None
                index = plan.take(worker)
        except BaseException as error:  # handed to the hasher, which raises it
            with written:
                failed.append(error)
                written.notify()
        finally:
            close_quietly(stream)

    workers: list[threading.Thread] = []

    def hire(count: int) -> None:
        while len(workers) < min(count, len(chunks)):
            n = len(workers)
            args = (n, first if n == 0 else None)  # the others take their own chunks
            worker = threading.Thread(target=work, args=args, daemon=True, name=f"modelcache-{n}")
            workers.append(worker)
            worker.start()

    def written_after(position: int) -> int:
        """Where the written bytes from ``position`` on end, once some are or a moment passed
        (then ``position``); raises what a worker raised."""
        with written:
            if failed:
                raise failed[0]
            if part.cancel.is_set():
                raise Cancelled
            reach = part.ranges.reach(position)
            if reach == position:
                written.wait(0.25)
                reach = part.ranges.reach(position)
            return reach

    def grow() -> None:
        changed = growth.check()
        if changed is not None:  # more workers, or back to fewer
            plan.resize(changed)
            hire(changed)
        elif growth.futile:
            plan.close()  # one stream is as fast here: the engine reads the rest that way

    hire(growth.workers)
    try:
        index = 0
        while index < plan.count:
            begin, end = chunks[index]
            part.hash_kept(begin)  # bytes between chunks, kept from before
            while part.hashed < end:
                part.hash_kept(min(end, written_after(part.hashed)))
                plan.hashed(part.hashed)
                grow()
            index += 1
    finally:
        plan.stop()
        if first is not None and not workers:
            close_quietly(first)
        for worker in workers:
            worker.join()
    return 0 if growth.futile else growth.workers


def _fetch_chunk(
    part: Part,
    reader: Reader,
    bounds: Chunk,
    stream: RangeStream | None,
    buffer: bytearray,
    abort: threading.Event,
    budget: RetryBudget,
    wrote: Callable[[], None],
) -> None:
    """Fetch one chunk into the file, retrying from where it stopped; raises what it cannot
    retry (a transient error too, when the origin refused ranges or changed the file)."""
    position, end = bounds
    etag = part.ranges.etag
    while True:
        try:
            if stream is None:
                stream = reader.open(position, end, etag)
                changed = etag is not None and stream.etag not in (None, etag)
                if not stream.ranged and not changed:
                    raise RangesRefused("the origin ignored a range; one stream now")
                if stream.start != position or changed:
                    raise OriginChanged("the file changed at the origin; starting again")
            for piece in _body(stream, buffer, end - position):
                if abort.is_set() or part.cancel.is_set():
                    return
                position = part.store(piece, position)
                wrote()
                budget.progressed()
                if position >= end:
                    return
            raise TransientError(f"connection closed at byte {position} of {end}")
        except TransientError as error:
            if isinstance(error, (OriginChanged, RangesRefused)):
                raise  # a new version, or no ranges: the engine's outer loop decides
            close_quietly(stream)
            stream = None
            budget.wait(error)
        finally:
            close_quietly(stream)
            stream = None


def _body(stream: RangeStream, buffer: bytearray, left: int) -> Iterator[bytes | memoryview]:
    """The next at most ``left`` bytes of the body, piece by piece (into ``buffer`` when the
    reader can skip a copy)."""
    if stream.readinto is None:
        for piece in stream.pieces:
            yield piece[:left]
            left -= len(piece)
            if left <= 0:
                return
        return
    view = memoryview(buffer)
    while left > 0:
        got = stream.readinto(view[: min(len(view), left)])
        if not got:
            return
        yield view[:got]
        left -= got
