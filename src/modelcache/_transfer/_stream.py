"""One stream: a thread reads the response into reusable buffers and writes each where it
belongs, while the hasher thread (the caller) hashes the buffers in order.

The file is never read twice and reading overlaps hashing; the buffers bound the memory.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from modelcache._retry import Cancelled, RetryBudget

from ._options import MiB
from ._part import Part, handed_over
from ._reader import RangeStream, close_quietly

__all__ = ["StreamEnd", "stream_through"]

_HAND_OVER = 0.25  # seconds a partly filled buffer waits before it is hashed anyway
_BUFFERED = 4 * MiB  # bytes of reusable buffers between the reading thread and the hasher
_TRUSTED = 0.05  # seconds a stream must stay fast (from its first byte) to be judged fast
#: seconds a stream is timed over at least before its rate is judged: its first bytes come in
#: a burst (what the origin's and the kernel's buffers held), which a shorter time overrates
_TIMED_FOR = 0.02
_WATCHED_OVER = 1.0  # seconds a watched stream's rate is measured over, window after window
#: seconds a read may wait, once the stream's first bytes are due to be judged, before the
#: hasher judges them (the origin paused after a burst: nginx's ``limit_rate`` sends a new
#: answer's first 2 MiB at once, then nothing for 0.1 s)
_SILENT = 0.01
_LISTENED = 0.005  # seconds the hasher waits for a buffer while it may judge a silence


class StreamEnd:
    """Where a stream ended, and its rate when it ran too slow.

    ``stalled``: the stream was judged while a read waited (its first bytes came in a burst,
    then the origin paused): it was closed there, and ``slow`` is only an upper bound.
    """

    def __init__(self, position: int, slow: float | None = None, *, stalled: bool = False) -> None:
        self.position = position
        self.slow = slow
        self.stalled = stalled


class _Reading:
    """Where the reading thread stands, for the hasher to judge a stream whose read waits."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.waiting: float | None = None  # since when a read waits for the origin
        self.judging = True  # until the reading thread judged the stream itself


def stream_through(
    part: Part,
    stream: RangeStream,
    end: int | None,
    piece_size: int,
    budget: RetryBudget,
    *,
    decide: tuple[int, float] | None = None,
    watch: float | None = None,
) -> StreamEnd:
    """Read ``stream`` to its end or to byte ``end``, hashing here while a thread reads and writes.

    Bytes of ``[part.hashed, stream.start)`` must be written already: they are hashed from disk
    first. ``decide=(position, rate)``: once the stream passed ``position``, it stops there when
    it ran slower than ``rate`` bytes per second (judged again after each buffer until it ran
    fast for :data:`_TRUSTED` seconds, and once more as a whole when it was read to ``end``).
    When that judgment is due but a read waits (:data:`_SILENT`) on a connection the origin
    sent nothing more on, and the stream is slow whatever that read brings, it is judged at
    once and closed (``stalled``; streams that tell ``silent``: closing them ends the read).
    ``watch=rate``: once judged (or from the start), the stream also stops when it ran slower
    than ``rate`` over a window of :data:`_WATCHED_OVER` seconds (a token bucket's burst ran
    out). Returns where the stream ended and, when it stopped so or was slow as a whole, the
    rate it ran at. The stream is then left open, at that position, for the caller to read on
    (unless stalled); otherwise it is closed, whatever happens.
    """
    free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(max(2, _BUFFERED // piece_size)):
        free.put(bytearray(piece_size))
    filled: queue.SimpleQueue[Any] = queue.SimpleQueue()
    stop = threading.Event()
    began = time.monotonic()  # the answer's headers are in: its body starts now
    reading = _Reading(stream.start)
    reader = threading.Thread(
        target=_read,
        args=(part, stream, end, decide, watch, free, filled, stop, budget, reading, began),
        daemon=True,
        name="modelcache-stream",
    )
    reader.start()
    listening = decide is not None and stream.silent is not None
    stalled = False

    def judge_silence() -> None:
        """Judge the stream here when its judgment is due and a read waits."""
        nonlocal stalled
        waiting = reading.waiting
        if decide is None or stream.silent is None or stalled or waiting is None:
            return
        now = time.monotonic()
        took, got = now - began, reading.position - stream.start
        if (
            reading.judging
            and reading.position >= decide[0]
            and took >= _TIMED_FOR
            and now - waiting >= _SILENT
            and (got + piece_size) / took < decide[1]  # (slow whatever that read brings)
            and stream.silent()  # (the origin paused: not this process, short of CPU)
        ):
            stalled = True
            stop.set()
            close_quietly(stream)  # ends the read

    item: Any = None
    try:
        part.hash_kept(stream.start)
        while True:
            try:
                item = handed_over(
                    lambda timeout: filled.get(timeout=timeout),
                    part.cancel,
                    every=_LISTENED if listening and reading.judging else 0.25,
                    idle=judge_silence if listening else None,
                )
            except Exception:
                if not stalled or part.cancel.is_set():
                    raise
                item = StreamEnd(part.hashed)  # (the read closing the stream ended)
            if isinstance(item, StreamEnd):
                break
            data, buffer = item
            part.hash(data)
            free.put(buffer)
    finally:
        stop.set()
        if not (isinstance(item, StreamEnd) and item.slow is not None):
            close_quietly(stream)  # (which also ends a read that waits on a silent origin)
        reader.join()  # (a slow stream's reader has returned: it left the stream as it was)
    if part.cancel.is_set():
        raise Cancelled
    if stalled:  # (whatever the reading thread concluded meanwhile: the stream is closed)
        rate = (part.hashed - stream.start) / (time.monotonic() - began)
        return StreamEnd(part.hashed, rate, stalled=True)
    return item


def _read(
    part: Part,
    stream: RangeStream,
    end: int | None,
    decide: tuple[int, float] | None,
    watch: float | None,
    free: queue.SimpleQueue[bytearray],
    filled: queue.SimpleQueue[Any],
    stop: threading.Event,
    budget: RetryBudget,
    reading: _Reading,
    began: float,
) -> None:
    """The reading thread: fill free buffers, write them in place, queue them in order."""
    position = stream.start
    pieces = None if stream.readinto is not None else iter(stream.pieces)
    judged = decide  # (``decide`` is dropped once the stream is trusted)
    window = (began, position)  # where the watched window started
    try:
        while not stop.is_set() and not part.cancel.is_set():
            if end is not None and position >= end:
                break
            if decide is not None and position >= decide[0]:
                took = time.monotonic() - began
                rate = (position - stream.start) / took if took >= _TIMED_FOR else None
                if rate is not None and rate < decide[1]:
                    reading.judging = False
                    filled.put(StreamEnd(position, rate))  # slow: the caller goes on otherwise
                    return
                if took >= _TRUSTED:
                    reading.judging = False
                    decide = None  # fast for long enough: on to the end
                # else: a burst (buffers, a token bucket) may have carried the first chunk:
                # judged again after each buffer until the rate held for long enough
            elif watch is not None:
                now = time.monotonic()
                if now - window[0] >= _WATCHED_OVER:  # one more window: how fast was it?
                    rate = (position - window[1]) / (now - window[0])
                    if decide is None and rate < watch:
                        filled.put(StreamEnd(position, rate))  # slowed down: the caller goes on
                        return
                    window = (now, position)
            try:
                buffer = free.get(timeout=0.25)
            except queue.Empty:
                continue
            want = len(buffer) if end is None else min(len(buffer), end - position)
            reading.waiting = time.monotonic()
            if pieces is None:
                data: bytes | memoryview = _fill(stream, memoryview(buffer)[:want])
            else:
                data = next(pieces, b"")[: end - position if end is not None else None]
            reading.waiting = None
            if not data:
                break
            position = reading.position = part.store(data, position)
            filled.put((data, buffer))
            budget.progressed()
        reading.judging = False
        if judged is not None and end is not None and position >= end:
            # read to its end: its whole rate decides too, as a burst (a token bucket,
            # nginx's first send) may have carried it past the trusted time
            took = time.monotonic() - began
            if took > 0 and (whole := (position - stream.start) / took) < judged[1]:
                filled.put(StreamEnd(position, whole))
                return
        filled.put(StreamEnd(position))
    except BaseException as error:  # handed to the hashing thread, which raises it
        filled.put(error)


def _fill(stream: RangeStream, view: memoryview) -> memoryview:
    """Read into ``view`` until it is full, the body ends, or a moment passed."""
    assert stream.readinto is not None
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
