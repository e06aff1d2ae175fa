"""Resumable, verified, retrying copy of one remote file into a local ``.part`` file.

A download starts with one ranged request for its first chunks: a thread reads the stream into a
few reusable buffers and writes each where it belongs (``os.pwrite``) while the calling thread
hashes the buffers in order, so the file is never read twice and reading and hashing overlap.
That request's rate decides the rest. At least ``TransferOptions.split_below``: one more request
streams the rest the same way. Slower (origins and CDNs that cap each connection): the rest is
fetched as consecutive chunks by several workers at once (ranged requests), still hashed in
order as they arrive: chunks ahead of the hashing frontier wait in memory, and workers may run
at most ``connections`` chunks ahead, which bounds memory to about ``connections * chunk_size``.
Every request is bounded or read to its end, so no byte leaves the origin twice.

The frontier (bytes written and hashed without a gap) is recorded beside the part file, so a
download killed at any point resumes from there: the kept prefix is re-hashed from disk, not
fetched again.

Readers (one per kind of source) only know how to open a byte range; the engine owns retries,
ordering, hashing, progress and cancellation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import queue
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FatalError",
    "Progress",
    "RangeStream",
    "Reader",
    "TransferOptions",
    "TransferResult",
    "TransientError",
    "download",
]

MiB = 1 << 20
_SAVE_EVERY = 0.5  # seconds between two records of the resume frontier
_PROBE_CHUNKS = 2  # a first ranged request of this many chunks measures the origin's rate
_HAND_OVER = 0.25  # seconds a partly filled buffer waits before it is hashed anyway
_BUFFERED = 4 * MiB  # bytes of reusable buffers between a single stream and its hasher
Progress = Callable[[int, "int | None"], None]
"""A progress callback: ``(bytes_done, bytes_total_or_None)``."""


@dataclass(frozen=True)
class TransferOptions:
    """How downloads behave; every field has a default that suits a web service.

    Attributes:
        connections: concurrent ranged requests per file at most (1 = a single stream).
        chunk_size: bytes asked for by each ranged request.
        piece_size: bytes read from the network at a time.
        split_below: bytes per second; a download's first request (two chunks) measures the
            origin's rate: below this, the rest is fetched as ``connections`` parallel ranged
            requests, else as one stream. ``math.inf``: parallel from the first byte; ``0``:
            one stream, no first measure.
        retries: attempts after a transient failure, counted since the last byte of progress.
        backoff: first retry delay in seconds, doubled each attempt, with jitter.
        max_backoff: cap on one delay (a longer ``Retry-After`` is honoured up to ``deadline``).
        deadline: give up when no byte arrived for this long while retrying.
        stall_timeout: a connection that delivers no byte for this long is an error (retried).
        connect_timeout: seconds to open a connection.
    """

    connections: int = 8
    chunk_size: int = 2 * MiB
    piece_size: int = 256 * 1024
    split_below: float = 256 * MiB
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    deadline: float = 60.0
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.connections < 1 or self.chunk_size < 1 or self.piece_size < 1:
            raise ValueError("connections, chunk_size and piece_size must be >= 1")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if not self.split_below >= 0:
            raise ValueError("split_below must be >= 0 (math.inf: always parallel)")


class TransientError(Exception):
    """A failure worth retrying (connection error, timeout, 408, 429, 5xx)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class FatalError(Exception):
    """A failure that retrying cannot fix (401, 403, 404, bad URL, ...)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class RangeStream:
    """An open response for a byte range.

    Attributes:
        pieces: the body, in order.
        start: where the body starts in the file (0 when the origin ignored the range).
        size: the whole file's size, when the origin said.
        etag: the origin's validator for this version of the file, if any.
        ranged: whether the origin honoured the range (so later chunks may be ranged too).
        close: release the response (whether or not the body was read).
        readinto: reads the next bytes of the body into a buffer and returns how many (0 at
            the end), for readers that can skip a copy; the engine then uses it, not ``pieces``.
    """

    pieces: Iterator[bytes]
    start: int
    size: int | None
    etag: str | None
    ranged: bool
    close: Callable[[], None] = field(default=lambda: None)
    readinto: Callable[[memoryview], int] | None = None


class Reader(ABC):
    """Opens byte ranges of one remote file."""

    #: preferred bytes per ranged request, or None to use ``TransferOptions.chunk_size``
    chunk_size: int | None = None

    @abstractmethod
    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        """Open ``[start, end)`` (``end=None``: to the end). ``etag``: the version expected.

        Raises :class:`TransientError` or :class:`FatalError`. When the file changed since
        ``etag`` was recorded, the reader answers with ``start == 0`` (a fresh, whole copy).
        """

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections."""


@dataclass(frozen=True)
class TransferResult:
    """What a finished download produced."""

    size: int
    sha256: str
    etag: str | None
    fetched: int


# ---------------------------------------------------------------------------------------------
# resume state kept beside the part file


def _state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def read_resume_state(part: Path) -> tuple[int, str | None, int | None]:
    """``(frontier, etag, size)`` recorded for a part file; ``(0, None, None)`` when unusable."""
    try:
        state = json.loads(_state_path(part).read_text())
        frontier = int(state["frontier"])
        if frontier < 0 or part.stat().st_size < frontier:
            return 0, None, None
        return frontier, state.get("etag"), state.get("size")
    except (OSError, ValueError, KeyError, TypeError):
        return 0, None, None


def _write_resume_state(part: Path, frontier: int, etag: str | None, size: int | None) -> None:
    tmp = part.with_name(part.name + ".json.tmp")
    tmp.write_text(json.dumps({"frontier": frontier, "etag": etag, "size": size}))
    os.replace(tmp, _state_path(part))


def discard_part(part: Path) -> None:
    """Remove a part file and its resume state."""
    for path in (part, _state_path(part), part.with_name(part.name + ".json.tmp")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# retries


class _RetryBudget:
    """Shared by all workers of one download: counts failures since the last progress."""

    def __init__(self, options: TransferOptions, cancel: threading.Event) -> None:
        self._options = options
        self._cancel = cancel
        self._lock = threading.Lock()
        self._failures = 0
        self._last_progress = time.monotonic()

    def progressed(self) -> None:
        with self._lock:
            self._failures = 0
            self._last_progress = time.monotonic()

    def wait(self, error: TransientError) -> None:
        """Sleep before the next attempt, or raise ``FatalError`` when the budget is spent."""
        with self._lock:
            self._failures += 1
            failures = self._failures
            idle = time.monotonic() - self._last_progress
        options = self._options
        remaining = options.deadline - idle
        if failures > options.retries or remaining <= 0:
            raise FatalError(f"{error} (gave up after {failures} attempts in {idle:.1f}s)")
        delay = min(options.max_backoff, options.backoff * 2 ** (failures - 1))
        delay *= random.uniform(0.5, 1.5)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        if self._cancel.wait(min(delay, max(remaining, 0.0))):
            raise _Cancelled


class _Cancelled(Exception):
    pass


class _OriginChanged(TransientError):
    """The origin now serves another version of the file: start again from byte 0."""


class _RangesRefused(TransientError):
    """A ranged request got the whole file: read the rest as one stream."""


class _Stop:
    """End-of-chunk marker in a chunk's queue."""


_STOP = _Stop()


class _Pieces:
    """One chunk's pieces on their way to the hasher; at most ``limit`` wait at a time.

    A worker that gets that far ahead of the hasher waits (and stops reading its socket), so
    memory stays bounded even for a single stream the hasher cannot keep up with.
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


# ---------------------------------------------------------------------------------------------
# the engine


def download(
    reader: Reader,
    part: Path,
    *,
    options: TransferOptions,
    progress: Progress | None = None,
    on_size: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> TransferResult:
    """Fetch the reader's file into ``part``, resuming from its recorded frontier.

    ``on_size(total, already)`` is called once the size is known (to check free space).
    Raises :class:`FatalError` (including when retries are spent), :class:`OSError` for
    local failures, and ``KeyboardInterrupt``/``SystemExit`` untouched.
    """
    cancel = cancel or threading.Event()
    frontier, etag, size = read_resume_state(part)
    hasher = hashlib.sha256()
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        # held while this writer lives: nobody takes over a part file that is still written
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if frontier:
            _hash_prefix(fd, frontier, hasher)
        # Never truncated to zero here: ext4 (auto_da_alloc) then starts writing the file back
        # as it is written, which halved throughput. A stale tail past the frontier is simply
        # overwritten, and cut off once the download is complete.
        job = _Job(reader, part, fd, hasher, frontier, etag, size, options, progress, cancel)
        job.on_size = on_size
        return job.run()
    finally:
        os.close(fd)


def _hash_prefix(fd: int, length: int, hasher: Any) -> None:
    done = 0
    while done < length:
        data = os.pread(fd, min(8 * MiB, length - done), done)
        if not data:
            raise OSError("part file shrank while resuming")
        hasher.update(data)
        done += len(data)


class _Job:
    def __init__(
        self,
        reader: Reader,
        part: Path,
        fd: int,
        hasher: Any,
        frontier: int,
        etag: str | None,
        size: int | None,
        options: TransferOptions,
        progress: Progress | None,
        cancel: threading.Event,
    ) -> None:
        self.reader = reader
        self.part = part
        self.fd = fd
        self.hasher = hasher
        self.frontier = frontier
        self.etag = etag
        self.size = size
        self.options = options
        self.progress = progress
        self.cancel = cancel
        self.budget = _RetryBudget(options, cancel)
        self.fetched = 0
        self._fetched_lock = threading.Lock()
        self.on_size: Callable[[int, int], None] | None = None
        # the rest as one stream: parallel ranges not wanted, refused, or a first request was fast
        self.one_stream = options.connections == 1 or options.split_below == 0
        self._saved_at = time.monotonic()
        self._size_checked = False

    # -- the outer loop: one attempt per (re)connection of the first stream --------------------

    def run(self) -> TransferResult:
        while True:
            if self.cancel.is_set():
                raise FatalError("cancelled")
            try:
                self._attempt()
                if os.fstat(self.fd).st_size > self.frontier:
                    os.ftruncate(self.fd, self.frontier)  # the tail of an older version
                return TransferResult(
                    self.frontier, self.hasher.hexdigest(), self.etag, self.fetched
                )
            except TransientError as error:
                if isinstance(error, _OriginChanged):
                    self._restart_from_zero()
                    self.etag = self.size = None
                if isinstance(error, _RangesRefused):
                    self.one_stream = True
                try:
                    self.budget.wait(error)
                except _Cancelled:
                    raise FatalError("cancelled") from error

    def _restart_from_zero(self) -> None:
        self.hasher = hashlib.sha256()
        self.frontier = 0

    def _attempt(self) -> None:
        while self._attempt_once():
            pass
        self._save_state()

    def _attempt_once(self) -> bool:
        """One pass over the file from the frontier; True when more remains."""
        chunk = self.reader.chunk_size or self.options.chunk_size
        if self.size is not None and self.frontier == self.size:
            return False
        parallel = math.isinf(self.options.split_below)
        if self.one_stream:
            first_end = None  # the rest as one stream
        elif parallel:
            first_end = self.frontier + chunk  # ranged requests from the first byte
        else:
            first_end = self.frontier + _PROBE_CHUNKS * chunk  # its rate decides what follows
        stream = self.reader.open(self.frontier, first_end, self.etag)
        if stream.start != self.frontier:
            # the origin ignored the range or the file changed: start again from byte 0
            self._restart_from_zero()
        changed = (self.etag is not None and stream.etag not in (None, self.etag)) or (
            self.size is not None and stream.size not in (None, self.size)
        )
        if changed and self.frontier:
            stream.close()
            raise _OriginChanged("the file changed at the origin; starting again")
        self.etag = stream.etag
        self.size = stream.size
        if self.size is not None:
            self._check_size(self.size)
        more = False
        if first_end is None or not stream.ranged:
            self._stream_through(stream)  # to the end of the file
        elif self.size is None:
            # an origin that honours ranges but does not tell the size: one chunk at a time
            self._run_plan(stream, [(self.frontier, first_end)])
            more = self.frontier == first_end
        elif parallel:
            first_stop = min(first_end, self.size)
            self._run_plan(stream, [(self.frontier, first_stop), *self._chunks(first_stop, chunk)])
        else:
            rate = self._stream_through(stream)
            if self.frontier < self.size and rate is not None and rate < self.options.split_below:
                # a slow stream (a per-connection cap): the rest as parallel ranged requests
                self._run_plan(None, self._chunks(self.frontier, chunk))
            else:
                self.one_stream = True  # a fast stream: the rest as one more request
                more = self.frontier < self.size
        if not more and self.size is not None and self.frontier != self.size:
            raise TransientError(f"got {self.frontier} of {self.size} bytes")
        return more

    def _chunks(self, start: int, chunk: int) -> list[tuple[int, int | None]]:
        assert self.size is not None
        return [(s, min(s + chunk, self.size)) for s in range(start, self.size, chunk)]

    def _check_size(self, total: int) -> None:
        if self.on_size is not None and not self._size_checked:
            self._size_checked = True
            self.on_size(total, self.frontier)

    def _save_state(self) -> None:
        _write_resume_state(self.part, self.frontier, self.etag, self.size)
        self._saved_at = time.monotonic()

    def _maybe_save_state(self) -> None:
        """Record the frontier about once a second: a kill loses at most that much work."""
        if time.monotonic() - self._saved_at >= _SAVE_EVERY:
            self._save_state()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.frontier, self.size)

    def _store(self, data: bytes | memoryview, position: int) -> int:
        """Write fetched bytes where they belong (any thread); the position after them."""
        _pwrite_all(self.fd, data, position)
        with self._fetched_lock:
            self.fetched += len(data)
        return position + len(data)

    def _hashed(self, data: bytes | memoryview) -> None:
        """Hash the next bytes in order and advance the frontier (the hashing thread only)."""
        self.hasher.update(data)
        self.frontier += len(data)
        self._maybe_save_state()  # also within a long stream
        self._report()

    # -- one stream: a reading thread, hashed here ---------------------------------------------

    def _stream_through(self, stream: RangeStream) -> float | None:
        """Read ``stream`` to its end, hashing here while another thread reads and writes.

        Returns the rate it ran at in bytes per second (``None``: too quick to tell).
        """
        options = self.options
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(max(2, _BUFFERED // options.piece_size)):
            free.put(bytearray(options.piece_size))
        filled: queue.SimpleQueue[Any] = queue.SimpleQueue()
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read_stream,
            args=(stream, free, filled, stop),
            daemon=True,
            name="modelcache-stream",
        )
        reader.start()
        first: tuple[float, int] | None = None  # when the first bytes were hashed, and where
        last = 0.0
        try:
            while True:
                item = self._next(lambda timeout: filled.get(timeout=timeout))
                if item is _STOP:
                    break
                data, buffer = item
                self._hashed(data)
                free.put(buffer)
                last = time.monotonic()
                if first is None:
                    first = (last, self.frontier)
        finally:
            stop.set()
            _close(stream)
            reader.join()
            with contextlib.suppress(OSError):
                self._save_state()
        if self.cancel.is_set():
            raise FatalError("cancelled")
        if first is None or last - first[0] < 0.005:
            return None
        return (self.frontier - first[1]) / (last - first[0])

    def _read_stream(
        self,
        stream: RangeStream,
        free: queue.SimpleQueue[bytearray],
        filled: queue.SimpleQueue[Any],
        stop: threading.Event,
    ) -> None:
        """The reading thread: fill free buffers, write them in place, queue them in order."""
        position = self.frontier
        pieces = None if stream.readinto is not None else iter(stream.pieces)
        try:
            while not stop.is_set() and not self.cancel.is_set():
                try:
                    buffer = free.get(timeout=0.25)
                except queue.Empty:
                    continue
                if pieces is None:
                    data: bytes | memoryview = self._fill(stream, buffer)
                else:
                    data = next(pieces, b"")
                if not data:
                    break
                position = self._store(data, position)
                filled.put((data, buffer))
                self.budget.progressed()
            filled.put(_STOP)
        except BaseException as error:  # handed to the hashing thread, which raises it
            filled.put(error)

    def _fill(self, stream: RangeStream, buffer: bytearray) -> memoryview:
        """Read into ``buffer`` until it is full, the body ends, or a moment passed."""
        assert stream.readinto is not None
        view = memoryview(buffer)
        got = 0
        began = time.monotonic()
        while got < len(view):
            n = stream.readinto(view[got:])
            if not n:
                break
            got += n
            if time.monotonic() - began >= _HAND_OVER:
                break
        return view[:got]

    # -- workers and the in-order hasher ------------------------------------------------------

    def _run_plan(self, stream: RangeStream | None, chunks: list[tuple[int, int | None]]) -> None:
        """Fetch ``chunks`` with parallel workers, hashed in order; ``stream``: the first's."""
        limit = -(-self.options.chunk_size // self.options.piece_size) + 1
        queues = [_Pieces(limit) for _ in chunks]
        window = max(1, self.options.connections)
        state = {"next": 1, "hashed": 0}
        cond = threading.Condition()
        abort = threading.Event()

        def take() -> int | None:
            with cond:
                while not abort.is_set():
                    index = state["next"]
                    if index >= len(chunks):
                        return None
                    if index < state["hashed"] + window:
                        state["next"] = index + 1
                        return index
                    cond.wait(0.5)
                return None

        def work(first: RangeStream | None, index: int | None) -> None:
            while index is not None and not abort.is_set():
                self._fetch_chunk(index, chunks[index], first, queues[index], abort)
                first = None
                index = take()

        workers = [
            threading.Thread(target=work, args=(stream, 0), daemon=True, name="modelcache-0")
        ]
        workers += [
            threading.Thread(
                target=work, args=(None, take()), daemon=True, name=f"modelcache-{n + 1}"
            )
            for n in range(min(window, len(chunks)) - 1)
        ]
        for worker in workers:
            worker.start()
        try:
            for index in range(len(chunks)):
                self._consume(queues[index])
                with cond:
                    state["hashed"] = index + 1
                    cond.notify_all()
                self._maybe_save_state()
        finally:
            abort.set()
            with cond:
                cond.notify_all()
            _close(stream)
            for worker in workers:
                worker.join()
            with contextlib.suppress(OSError):
                self._save_state()  # whatever ends this pass, the next one resumes from here

    def _next(self, get: Callable[[float], Any]) -> Any:
        """The next item handed over by a reading thread; raises the errors it hands over."""
        while True:
            try:
                item = get(0.25)
            except queue.Empty:
                if self.cancel.is_set():
                    raise FatalError("cancelled") from None
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def _consume(self, pieces: _Pieces) -> None:
        while True:
            item = self._next(pieces.get)
            if item is _STOP:
                return
            self._hashed(item)

    def _fetch_chunk(
        self,
        index: int,
        bounds: tuple[int, int | None],
        stream: RangeStream | None,
        out: _Pieces,
        abort: threading.Event,
    ) -> None:
        """Stream one chunk into the file and the queue, retrying from where it stopped."""
        position, end = bounds
        try:
            while True:
                try:
                    if stream is None:
                        stream = self.reader.open(position, end, self.etag)
                        changed = self.etag is not None and stream.etag not in (None, self.etag)
                        if not stream.ranged and not changed:
                            stream.close()
                            raise _RangesRefused("the origin ignored a range; one stream now")
                        if stream.start != position or changed:
                            stream.close()
                            raise _OriginChanged("the file changed at the origin; starting again")
                    for piece in stream.pieces:
                        if abort.is_set() or self.cancel.is_set():
                            return
                        if end is not None and position + len(piece) > end:
                            piece = piece[: end - position]
                        position = self._store(piece, position)
                        if not out.put(piece, abort):
                            return
                        self.budget.progressed()
                        if end is not None and position >= end:
                            break
                    if end is not None and position < end and self.size is not None:
                        raise TransientError(f"connection closed at byte {position} of {end}")
                    # (a clean end before ``end`` when the size is unknown is the end of file)
                    out.signal(_STOP)
                    return
                except TransientError as error:
                    if end is None or isinstance(error, (_OriginChanged, _RangesRefused)):
                        raise  # a single stream (or a new version) is retried by the outer loop
                    stream = _close(stream)
                    self.budget.wait(error)
                finally:
                    stream = _close(stream)
        except _Cancelled:
            out.signal(FatalError("cancelled"))
        except BaseException as error:  # handed to the hashing thread, which raises it
            out.signal(error)


def _close(stream: RangeStream | None) -> RangeStream | None:
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.close()
    return None


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
