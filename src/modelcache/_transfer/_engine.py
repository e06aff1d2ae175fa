"""The engine: one remote file into a local part file, resumed, hashed in order, retried.

A download starts with one request for its first few chunks (:data:`PROBE_CHUNKS`), read by one
stream (:mod:`._stream`). Its rate over the first :data:`JUDGED_AFTER` bytes decides the rest
(judged again until a fast rate held long enough to be trusted; judged while a read still
waits when the origin paused after a burst, and then closed). At least
``TransferOptions.split_below``: it is read to its end, and the rest of the file is asked for
with one more request and read as one stream. Slower (origins and CDNs that cap each
connection, or a link slower than that): the first request is read on to its end while
parallel workers fetch the chunks after it (:mod:`._ranges`), as many as raise the total rate;
when the first of them together are no faster than that one stream, the link is the limit,
not a cap, and the rest is read as one stream after all. A long stream is watched
(:data:`WATCHED_FROM`): when it slows down (a token bucket's burst ran out), it is cut at the
end of the chunk it is in and the rest goes parallel after all, once per download. Every other
request is bounded or read to its end, so no byte leaves the origin twice; but for readers that
ask for the whole rest with the first request (``Reader.first_request_to_end``: S3, where a GET
costs more than the few bytes a capped connection has in flight when it is cut there), a
watched stream cut, and a first request closed during a pause.

Every byte written is recorded in the range map beside the part file (:mod:`._resume`), so a
download killed at any point resumes with only the missing ranges: each pass over the file asks
for the first missing range (with the recorded validator, so a changed file starts again from
byte 0 instead of being spliced), and the ranges kept from before are hashed from disk when the
in-order hash reaches them.

Readers (one per kind of source) only know how to open a byte range; the engine owns retries,
ordering, hashing, progress and cancellation.
"""

from __future__ import annotations

import contextlib
import enum
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelcache._posix import probe_lock
from modelcache._retry import Cancelled, RetryBudget, TransientError

from ._options import MiB, TransferOptions
from ._part import Part, Progress
from ._ranges import START_WORKERS, Chunk, OriginChanged, RangesRefused, fetch_ranges
from ._reader import RangeStream, Reader, close_quietly
from ._resume import RangeMap, saving
from ._stream import stream_through

__all__ = ["TransferResult", "download"]

#: chunks the first request asks for, at most :data:`PROBE_BYTES` (but two chunks at least):
#: enough to time the origin and to trust the rate, small enough that a
#: capped connection finishes it while the others fetch the rest
PROBE_CHUNKS = 8
PROBE_BYTES = 16 * MiB
#: bytes of the first request its rate is first judged over (then again after each buffer, until
#: a fast rate held long enough to be trusted): a capped connection is told quickly
JUDGED_AFTER = 512 * 1024
#: a stream this many first requests long (or longer) is watched: when it slows below half of
#: ``split_below`` (or of the rate a futile parallel pass was measured against) over a second,
#: the rest goes parallel after all (a CDN's token bucket outlasted the first request's judgment)
WATCHED_FROM = 4


@dataclass(frozen=True)
class TransferResult:
    """What a finished download produced."""

    size: int
    sha256: str
    etag: str | None
    fetched: int


def download(
    reader: Reader,
    part: Path,
    *,
    options: TransferOptions,
    progress: Progress | None = None,
    on_size: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> TransferResult:
    """Fetch the reader's file into ``part``, keeping what its range map says is written.

    ``on_size(total, already)`` is called once the size is known (to check free space).
    Raises :class:`FatalError` (including when retries are spent, and :class:`Cancelled`),
    :class:`OSError` for local failures, and ``KeyboardInterrupt``/``SystemExit`` untouched.
    """
    ranges = RangeMap.load(part)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        # held while this writer lives: nobody takes over a part file that is still written
        probe_lock(fd)
        # Never truncated to zero here: ext4 (auto_da_alloc) then starts writing the file back
        # as it is written, which halved throughput. Stale bytes outside the recorded ranges
        # are simply overwritten, and a stale tail is cut off once the download is complete.
        job = _Job(reader, Part(fd, ranges, progress, cancel or threading.Event()), options)
        job.on_size = on_size
        with saving(ranges):
            return job.run()
    finally:
        os.close(fd)


class _Mode(enum.Enum):
    PROBE = "the next request measures the origin's rate"
    ONE_STREAM = "one request per missing range"
    PARALLEL = "missing ranges as chunks fetched by parallel workers"


class _Job:
    def __init__(self, reader: Reader, part: Part, options: TransferOptions) -> None:
        self.reader = reader
        self.part = part
        self.options = options
        self.budget = RetryBudget(options, part.cancel)
        self.chunk = reader.chunk_size or options.chunk_size
        self.probe = max(2 * self.chunk, min(PROBE_CHUNKS * self.chunk, PROBE_BYTES))
        self.on_size: Callable[[int, int], None] | None = None
        self._size_checked = False
        self.workers = START_WORKERS  # parallel workers a pass starts with (what the last used)
        self.rate: float | None = None  # the one stream's rate that sent the rest parallel
        #: the rate below which a long stream goes parallel after all (None: not watched)
        self.watch: float | None = None
        if options.connections == 1 or options.split_below == 0:
            self.mode = _Mode.ONE_STREAM
        elif options.split_below == float("inf"):
            self.mode = _Mode.PARALLEL
        else:
            self.mode = _Mode.PROBE
            self.watch = options.split_below / 2

    def run(self) -> TransferResult:
        """Passes over the file until nothing is missing, retrying transient failures."""
        while True:
            if self.part.cancel.is_set():
                raise Cancelled
            try:
                try:
                    while self._pass():
                        pass
                finally:
                    with contextlib.suppress(OSError):
                        self.part.ranges.save()  # whatever ends a pass, the next one resumes here
                return self._finish()
            except TransientError as error:
                if isinstance(error, OriginChanged):
                    self.part.restart()
                if isinstance(error, RangesRefused):
                    self.mode = _Mode.ONE_STREAM
                self.budget.wait(error)

    def _finish(self) -> TransferResult:
        part, size = self.part, self.part.ranges.size
        assert size is not None  # a pass ends the download only once the size is known
        part.hash_kept(size)
        if os.fstat(part.fd).st_size > size:
            os.ftruncate(part.fd, size)  # the tail of an older version
        part.ranges.save()
        return TransferResult(size, part.hasher.hexdigest(), part.ranges.etag, part.fetched)

    def _pass(self) -> bool:
        """One request at the first missing byte (and the chunks after it when parallel).

        False when nothing is missing.
        """
        ranges = self.part.ranges
        gaps = ranges.gaps(self.part.hashed, ranges.size)
        if not gaps:
            return False
        start, gap_end = gaps[0]
        end = None if gap_end == ranges.size else gap_end  # (the last gap: to the end)
        probe_end = _min(start + self.probe, end)  # where a probing request's first chunk ends
        if self.mode is _Mode.PARALLEL:
            end = _min(start + self.chunk, gap_end)
        elif self.mode is _Mode.PROBE and not self.reader.first_request_to_end:
            end = probe_end
        stream = self.reader.open(start, end, ranges.etag)
        try:
            if self._take_version(stream, start):
                start = 0
        except BaseException:
            close_quietly(stream)
            raise
        if not stream.ranged:
            end = None  # the origin sent the whole file: read all of it
        if self.mode is _Mode.PARALLEL and stream.ranged and ranges.size is not None:
            assert end is not None
            first = (start, min(end, ranges.size))
            self._fetch_ranges(stream, [first, *self._chunks(first[1])])
            return True
        # what this stream will read, when the rest could go as parallel ranges instead
        length = _min(ranges.size, end) - start if stream.ranged and ranges.size is not None else 0
        decide = None  # whether this stream's first bytes decide between it and parallel ranges
        if self.mode is _Mode.PROBE and length >= 2 * self.chunk:
            # (a rest shorter than a chunk is read on: ranges would not fetch it any sooner)
            decide = (start + min(self.chunk, JUDGED_AFTER), self.options.split_below)
        # how slow this stream may run before the rest goes parallel after all
        watch = self.watch if length >= WATCHED_FROM * self.probe else None
        streamed = stream_through(
            self.part,
            stream,
            end,
            self.options.piece_size,
            self.budget,
            decide=decide,
            watch=watch,
        )
        ended = streamed.position
        if streamed.slow is not None:  # maybe a per-connection cap: try parallel ranges
            assert ranges.size is not None
            self.mode = _Mode.PARALLEL
            self.watch = None  # (a stream is watched once a download)
            if streamed.stalled:  # its rate is only a bound: the workers measure their own
                self.rate, self.workers = None, START_WORKERS
            else:
                self.rate = streamed.slow
                # as many as reach split_below at this rate each: a capped origin gets enough
                # at once, a link just short of split_below a small trial
                wanted = math.ceil(self.options.split_below / max(streamed.slow, 1.0))
                self.workers = max(2, min(self.options.connections, wanted))
            # this stream reads on to the end of its first request's chunks (when it was
            # judged by its reading thread), or of the chunk it is in (a watched stream, or a
            # stalled one, closed: a worker asks for that chunk's rest); what an open-ended
            # one sent past there is not read
            floor = probe_end if decide is not None and not streamed.stalled else ended
            boundary = ended - ended % self.chunk + self.chunk
            stop = min(max(floor, boundary), _min(ranges.size, end))
            rest = self._chunks(stop)
            if ended < stop and not streamed.stalled:
                self._fetch_ranges(stream, [(ended, stop), *rest])
            else:
                close_quietly(stream)  # (a stalled one is closed already)
                self._fetch_ranges(None, [(ended, stop), *rest] if ended < stop else rest)
            return True
        if decide is not None:
            self.mode = _Mode.ONE_STREAM  # a fast origin: the rest as one stream
        self._check_end(ended, end)
        return True

    def _take_version(self, stream: RangeStream, start: int) -> bool:
        """Check the answer is the version recorded, and record its validator and size.

        True when the answer is a fresh copy from byte 0 (the origin ignored the range, or the
        file changed and the origin said so by sending all of it): everything kept is dropped.
        Raises :class:`OriginChanged` when another version answered a ranged request.
        """
        ranges = self.part.ranges
        restarted = stream.start != start
        if restarted:
            if stream.start != 0:
                raise TransientError(f"asked for byte {start}, the origin sent {stream.start}")
            self.part.restart()
        changed = (
            (ranges.etag is not None and stream.etag not in (None, ranges.etag))
            or (ranges.size is not None and stream.size not in (None, ranges.size))
            or (stream.size is not None and ranges.extent > stream.size)
        )
        if changed and ranges.done:
            raise OriginChanged("the file changed at the origin; starting again")
        if stream.etag is not None:
            ranges.etag = stream.etag
        if stream.size is not None:
            ranges.size = stream.size
            if self.on_size is not None and not self._size_checked:
                self._size_checked = True
                self.on_size(stream.size, ranges.done)
        return restarted

    def _check_end(self, ended: int, end: int | None) -> None:
        """A stream that ended before ``end``: the end of the file, or a connection cut."""
        ranges = self.part.ranges
        if ranges.size is None:
            if end is None or ended < end:
                ranges.size = ended  # the origin never said: this is where the file ends
        elif ended < (ranges.size if end is None else min(end, ranges.size)):
            raise TransientError(f"connection closed at byte {ended} of {ranges.size}")

    def _chunks(self, start: int) -> list[Chunk]:
        """Every missing range after ``start``, cut into chunks at multiples of the chunk size
        (where a stream stopped does not shift every later request); in the file's last
        ``connections`` chunks, quarter chunks, so the workers finish close together."""
        size, chunk = self.part.ranges.size, self.chunk
        assert size is not None  # (ranges only once the size is known)
        tail = max(0, size - self.options.connections * chunk)
        small = max(1, chunk // 4)
        return [
            (max(first, low), min(first + step, high))
            for begin, last in self.part.ranges.gaps(start, size)
            if last is not None
            for step, low, high in (
                (chunk, begin, min(last, tail)),
                (small, max(begin, tail), last),
            )
            for first in range(low - low % step, high, step)
        ]

    def _fetch_ranges(self, first: RangeStream | None, chunks: list[Chunk]) -> None:
        if not chunks:
            close_quietly(first)
            return
        workers = fetch_ranges(
            self.part,
            self.reader,
            first,
            chunks,
            connections=self.options.connections,
            chunk_size=self.chunk,
            piece_size=self.options.piece_size,
            budget=self.budget,
            start=self.workers,
            baseline=self.rate,
        )
        if workers:
            self.workers = workers
        else:
            self.mode = _Mode.ONE_STREAM  # parallel ranges were no faster than one stream
            if self.watch is not None and self.rate is not None:
                self.watch = min(self.watch, self.rate / 2)


def _min(value: int, limit: int | None) -> int:
    return value if limit is None else min(value, limit)
