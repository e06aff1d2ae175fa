"""Resumable, verified, retrying copy of one remote file into a local ``.part`` file.

The engine streams a file as consecutive chunks fetched by several workers at once (ranged
requests, for origins that cap each connection), writes each piece where it belongs with
``os.pwrite`` and hashes the pieces *in order* as they arrive, so the file is never read twice.
Chunks ahead of the hashing frontier wait in memory, and workers may run at most ``connections``
chunks ahead, which bounds memory to about ``connections * chunk_size``.

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
Progress = Callable[[int, "int | None"], None]
"""A progress callback: ``(bytes_done, bytes_total_or_None)``."""


@dataclass(frozen=True)
class TransferOptions:
    """How downloads behave; every field has a default that suits a web service.

    Attributes:
        connections: concurrent ranged requests per file (1 = a single stream).
        chunk_size: bytes asked for by each ranged request.
        piece_size: bytes read from the network at a time.
        retries: attempts after a transient failure, counted since the last byte of progress.
        backoff: first retry delay in seconds, doubled each attempt, with jitter.
        max_backoff: cap on one delay (a longer ``Retry-After`` is honoured up to ``deadline``).
        deadline: give up when no byte arrived for this long while retrying.
        stall_timeout: a connection that delivers no byte for this long is an error (retried).
        connect_timeout: seconds to open a connection.
    """

    connections: int = 8
    chunk_size: int = 2 * MiB
    piece_size: int = 1 * MiB
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
    """

    pieces: Iterator[bytes]
    start: int
    size: int | None
    etag: str | None
    ranged: bool
    close: Callable[[], None] = field(default=lambda: None)


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
        else:
            os.ftruncate(fd, 0)
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
        self._saved_at = time.monotonic()
        self._size_checked = False

    # -- the outer loop: one attempt per (re)connection of the first stream --------------------

    def run(self) -> TransferResult:
        while True:
            if self.cancel.is_set():
                raise FatalError("cancelled")
            try:
                self._attempt()
                return TransferResult(
                    self.frontier, self.hasher.hexdigest(), self.etag, self.fetched
                )
            except TransientError as error:
                if isinstance(error, _OriginChanged):
                    self._restart_from_zero()
                    self.etag = self.size = None
                try:
                    self.budget.wait(error)
                except _Cancelled:
                    raise FatalError("cancelled") from error

    def _restart_from_zero(self) -> None:
        self.hasher = hashlib.sha256()
        self.frontier = 0
        os.ftruncate(self.fd, 0)

    def _attempt(self) -> None:
        while self._attempt_once():
            pass
        self._save_state()

    def _attempt_once(self) -> bool:
        """One pass over the file from the frontier; True when more remains (size unknown)."""
        chunk = self.reader.chunk_size or self.options.chunk_size
        if self.size is not None and self.frontier == self.size:
            return False
        first_end = self.frontier + chunk if self.options.connections > 1 else None
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
        plan: list[tuple[int, int | None]] = []
        first_stop = first_end if stream.ranged else None
        if stream.ranged and self.size is not None and first_end is not None:
            first_stop = min(first_end, self.size)
            plan = [(s, min(s + chunk, self.size)) for s in range(first_stop, self.size, chunk)]
        elif not stream.ranged:
            first_stop = None
        self._run_plan(stream, first_stop, plan)
        if self.size is not None and self.frontier != self.size:
            raise TransientError(f"got {self.frontier} of {self.size} bytes")
        # an origin that honours ranges but does not tell the size: ask for the next chunk
        return self.size is None and first_stop is not None and self.frontier == first_stop

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

    # -- workers and the in-order hasher ------------------------------------------------------

    def _run_plan(
        self, stream: RangeStream, first_stop: int | None, plan: list[tuple[int, int | None]]
    ) -> None:
        chunks: list[tuple[int, int | None]] = [(self.frontier, first_stop), *plan]
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

        def work(first: RangeStream | None) -> None:
            index: int | None = 0 if first is not None else take()
            while index is not None and not abort.is_set():
                self._fetch_chunk(index, chunks[index], first, queues[index], abort)
                first = None
                index = take()

        workers = [threading.Thread(target=work, args=(stream,), daemon=True, name="modelcache-0")]
        extra = min(window, len(chunks)) - 1
        workers += [
            threading.Thread(target=work, args=(None,), daemon=True, name=f"modelcache-{n + 1}")
            for n in range(extra)
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
            stream.close()
            for worker in workers:
                worker.join()
            with contextlib.suppress(OSError):
                self._save_state()  # whatever ends this pass, the next one resumes from here

    def _consume(self, pieces: _Pieces) -> None:
        while True:
            try:
                item = pieces.get(timeout=0.25)
            except queue.Empty:
                if self.cancel.is_set():
                    raise FatalError("cancelled") from None
                continue
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise item
            self.hasher.update(item)
            self.frontier += len(item)
            self._maybe_save_state()  # also within a long single stream
            self._report()

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
                        if stream.start != position or (
                            self.etag is not None and stream.etag not in (None, self.etag)
                        ):
                            stream.close()
                            raise _OriginChanged("the file changed at the origin; starting again")
                    for piece in stream.pieces:
                        if abort.is_set() or self.cancel.is_set():
                            return
                        if end is not None and position + len(piece) > end:
                            piece = piece[: end - position]
                        _pwrite_all(self.fd, piece, position)
                        position += len(piece)
                        with self._fetched_lock:
                            self.fetched += len(piece)
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
                    if end is None or isinstance(error, _OriginChanged):
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


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
