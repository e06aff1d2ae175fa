"""The transfer engine: ordering, resume state, unknown sizes, cancellation, deadlines."""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FAST, MiB, make_payload, sha, tiles
from servers.hostile import HostileServer, Request, ranged

from modelcache import Cache, SourceError, TransferOptions
from modelcache._readers import HTTPReader
from modelcache._retry import RetryBudget
from modelcache._sources import Source
from modelcache._transfer import (
    FatalError,
    RangeStream,
    Reader,
    TransientError,
    download,
    read_resume_state,
)
from modelcache._transfer._part import Part
from modelcache._transfer._ranges import fetch_ranges
from modelcache._transfer._resume import RangeMap
from modelcache.testing import ModelServer


class MemoryReader(Reader):
    """A reader over bytes in memory (the engine's contract, not a network stand-in)."""

    def __init__(
        self,
        data: bytes,
        *,
        ranged: bool = True,
        tell_size: bool = True,
        piece: int = 100_000,
        fail_at: int | None = None,
    ) -> None:
        self.data = data
        self.ranged = ranged
        self.tell_size = tell_size
        self.piece = piece
        self.fail_at = fail_at
        self.opened: list[tuple[int, int | None]] = []

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        self.opened.append((start, end))
        if not self.ranged:
            start, end = 0, None
        stop = len(self.data) if end is None else min(end, len(self.data))
        return RangeStream(
            self._pieces(start, stop),
            start,
            len(self.data) if self.tell_size else None,
            '"v1"',
            self.ranged,
        )

    def _pieces(self, start: int, stop: int) -> Iterator[bytes]:
        for offset in range(start, stop, self.piece):
            if self.fail_at is not None and offset <= self.fail_at < offset + self.piece:
                self.fail_at = None
                raise TransientError("connection reset")
            yield self.data[offset : min(offset + self.piece, stop)]


def ranges_after(reader: MemoryReader, first: int) -> list[tuple[int, int]]:
    """The requests after the ``first`` ones, in file order; each must have been a bounded
    range (none asked for the rest of the file as one stream)."""
    rest = [(start, end) for start, end in reader.opened[first:] if end is not None]
    assert len(rest) == len(reader.opened) - first, "the rest was asked for as one stream"
    return sorted(rest)


@pytest.mark.parametrize("connections", [1, 4])
@pytest.mark.parametrize("tell_size", [True, False])
@pytest.mark.parametrize("ranged", [True, False])
@pytest.mark.parametrize("split_below", [0.0, 256.0 * MiB, 1e18, math.inf])
def test_every_shape_of_origin_gives_the_same_bytes(
    tmp_path: Path, connections: int, tell_size: bool, ranged: bool, split_below: float
) -> None:
    data = make_payload(3 * MiB + 777)
    reader = MemoryReader(data, ranged=ranged, tell_size=tell_size, fail_at=MiB + 5)
    options = replace(FAST, connections=connections, chunk_size=512 * 1024, split_below=split_below)
    part = tmp_path / "x.part"
    result = download(reader, part, options=options)
    assert part.read_bytes() == data
    assert result.sha256 == sha(data)
    assert result.size == len(data)


class SlowReader(MemoryReader):
    """A memory reader at about ``rate`` bytes/s per stream; ranges refused after ``honest``."""

    def __init__(self, data: bytes, rate: float, honest: int | None = None) -> None:
        super().__init__(data, piece=64 * 1024)
        self.rate = rate
        self.honest = honest

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        if self.honest is not None and len(self.opened) >= self.honest:
            self.opened.append((start, end))
            return RangeStream(self._slow(0, len(self.data)), 0, len(self.data), '"v1"', False)
        stream = super().open(start, end, etag)
        stream.pieces = self._slow(start, len(self.data) if end is None else end)
        return stream

    def _slow(self, start: int, stop: int) -> Iterator[bytes]:
        for piece in self._pieces(start, stop):
            time.sleep(len(piece) / self.rate)
            yield piece


def test_a_slow_single_stream_is_split_into_parallel_ranges(tmp_path: Path) -> None:
    data = make_payload(4 * MiB)
    reader = SlowReader(data, rate=2 * MiB)
    options = replace(FAST, connections=4, chunk_size=256 * 1024)
    result = download(reader, tmp_path / "x.part", options=options)
    assert result.sha256 == sha(data)
    # the first request asks for 8 chunks and is timed over its first one; too slow, it is read
    # on to its end while each remaining chunk is asked for on its own
    assert reader.opened[0] == (0, 8 * 256 * 1024)
    rest = ranges_after(reader, 1)
    assert tiles(rest, 2 * MiB, 4 * MiB)  # each byte asked for once
    assert max(end - start for start, end in rest) == 256 * 1024
    assert result.fetched == len(data)


def test_parallel_ranges_without_a_first_response_fetch_every_chunk(tmp_path: Path) -> None:
    # (the engine's path when a slow first request ended right where its chunks end)
    data = make_payload(3 * MiB + 5)
    reader = MemoryReader(data)
    fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT)
    try:
        part = Part(
            fd, RangeMap(tmp_path / "x.part", size=len(data), etag='"v1"'), None, threading.Event()
        )
        chunks = [(start, min(start + MiB, len(data))) for start in range(0, len(data), MiB)]
        fetch_ranges(
            part,
            reader,
            None,
            chunks,
            connections=2,
            chunk_size=MiB,
            piece_size=64 * 1024,
            budget=RetryBudget(FAST, part.cancel),
        )
    finally:
        os.close(fd)
    assert part.hasher.hexdigest() == sha(data)
    assert sorted(reader.opened) == chunks
    assert (tmp_path / "x.part").read_bytes() == data


class BurstReader(MemoryReader):
    """Each answer sends its first ``burst`` bytes fast, the rest at a capped ``rate``
    (``first_only``: only the first answer, whose connection's buffers were full)."""

    def __init__(
        self, data: bytes, burst: int, fast: float, rate: float, *, first_only: bool = False
    ) -> None:
        super().__init__(data, piece=64 * 1024)
        self.burst, self.fast, self.rate, self.first_only = burst, fast, rate, first_only

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        stream = super().open(start, end, etag)
        burst = 0 if self.first_only and len(self.opened) > 1 else self.burst
        stream.pieces = self._paced(start, len(self.data) if end is None else end, burst)
        return stream

    def _paced(self, start: int, stop: int, burst: int) -> Iterator[bytes]:
        left = burst  # (each answer has its own, as nginx's limit_rate gives)
        for piece in self._pieces(start, stop):
            time.sleep(len(piece) / (self.fast if left > 0 else self.rate))
            left -= len(piece)
            yield piece


def test_a_burst_that_carried_the_first_request_does_not_pass_for_a_fast_origin(
    tmp_path: Path,
) -> None:
    # 1.5 MiB at 20 MiB/s (75 ms, longer than the time a fast rate must hold), then 1 MiB/s:
    # the first request (8 chunks, 2 MiB) looks fast until it ends, and slow as a whole
    data = make_payload(6 * MiB)
    reader = BurstReader(data, burst=3 * MiB // 2, fast=20 * MiB, rate=MiB)
    options = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=8 * MiB)
    result = download(reader, tmp_path / "x.part", options=options)
    assert result.sha256 == sha(data)
    assert reader.opened[0] == (0, 2 * MiB)
    rest = ranges_after(reader, 1)
    assert tiles(rest, 2 * MiB, 6 * MiB)


def test_a_first_answer_overrated_by_its_burst_does_not_stop_parallel_ranges(
    tmp_path: Path,
) -> None:
    # the first answer sends 1 MiB at 32 MiB/s (what its connection's buffers held), then every
    # connection runs at 1 MiB/s: the first stream is judged slow at about 11 MiB/s, and two
    # workers with it fetch 3 MiB/s, short of what that rate promised. One worker alone is
    # slower still, so the burst misled, not the link: the workers grow on, and nothing is
    # read as one capped stream
    data = make_payload(4 * MiB)
    reader = BurstReader(data, burst=MiB, fast=32 * MiB, rate=MiB, first_only=True)
    options = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=16 * MiB)
    result = download(reader, tmp_path / "x.part", options=options)
    assert result.sha256 == sha(data)
    assert reader.opened[0] == (0, 2 * MiB)
    rest = ranges_after(reader, 1)
    assert tiles(rest, 2 * MiB, 4 * MiB)
    assert result.fetched == len(data)


def test_a_stream_that_slows_down_once_its_burst_ran_out_goes_parallel(tmp_path: Path) -> None:
    # every answer sends 2 MiB at 64 MiB/s, then 1 MiB/s (a token bucket): the first request
    # (2 MiB) is fast as a whole, so the rest is asked for as one stream, which slows down
    # after its own burst. Watched, it is cut at a chunk's end after a second below half of
    # split_below, and the chunks after it go parallel (here at once: each answer bursts)
    data = make_payload(12 * MiB)
    reader = BurstReader(data, burst=2 * MiB, fast=64 * MiB, rate=MiB)
    options = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=8 * MiB)
    result = download(reader, tmp_path / "x.part", options=options)
    assert result.sha256 == sha(data)
    assert reader.opened[:2] == [(0, 2 * MiB), (2 * MiB, None)]
    rest = ranges_after(reader, 2)
    cut = rest[0][0]
    assert 4 * MiB < cut < 6 * MiB  # after about a second
    assert cut % (256 * 1024) == 0
    assert tiles(rest, cut, 12 * MiB)
    assert result.fetched == len(data)


def test_a_first_answer_that_pauses_after_its_burst_is_judged_without_waiting(
    tmp_path: Path,
) -> None:
    # nginx's limit_rate sends a new answer's first bytes at once, then nothing until the rate
    # is paid back. The reading thread, blocked in that pause, cannot judge the stream; the
    # hasher sees the judgment is due and the stream slow whatever comes: it closes the
    # first answer and the rest goes parallel at once (here the pause lasts 3 s). The burst
    # ends inside a read's buffer: the bytes that read got are kept, not asked for again
    data = make_payload(4 * MiB)
    pause = threading.Event()
    served: list[tuple[int, int]] = []  # what the server sent, before any pause

    def pausing(request: Request) -> None:
        start, end = ranged(request, len(data)) or (0, len(data))
        headers = {"Content-Length": str(end - start), "ETag": '"p"'}
        request.head(206, headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        sent = start + (MiB + 100_000 if request.number == 0 else end - start)
        if request.write(data[start:sent]):
            served.append((start, sent))
            if request.number == 0:
                pause.wait(3.0)  # (set when the test ends: the server stops at once)
                request.write(data[sent:end])

    options = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=64 * MiB)
    with HostileServer() as server:
        url = server.route("/m.bin", pausing)
        began = time.monotonic()
        result = download(HTTPReader(Source.parse(url), options), tmp_path / "x", options=options)
        took = time.monotonic() - began
        pause.set()
    assert result.sha256 == sha(data)
    assert took < 1.5  # not the 3 s pause
    assert result.fetched == len(data)
    assert tiles(sorted(served), 0, len(data))  # no byte sent twice


class SharedLinkReader(MemoryReader):
    """Every answer shares one link of ``rate`` bytes/s (a link, not a cap, is the limit)."""

    def __init__(self, data: bytes, rate: float) -> None:
        super().__init__(data, piece=64 * 1024)
        self.rate = rate
        self._free_at = 0.0  # when the link is free for the next piece
        self._lock = threading.Lock()

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        stream = super().open(start, end, etag)
        stream.pieces = self._shared(start, len(self.data) if end is None else end)
        return stream

    def _shared(self, start: int, stop: int) -> Iterator[bytes]:
        for piece in self._pieces(start, stop):
            with self._lock:
                self._free_at = max(time.monotonic(), self._free_at) + len(piece) / self.rate
                done = self._free_at
            time.sleep(max(0.0, done - time.monotonic()))
            yield piece


def test_parallel_ranges_no_faster_than_one_stream_end_in_one_stream(tmp_path: Path) -> None:
    # a 4 MiB/s link: judged slow, the workers share it, and one worker alone is as fast; the
    # rest is read as one stream
    data = make_payload(6 * MiB)
    reader = SharedLinkReader(data, rate=4 * MiB)
    options = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=16 * MiB)
    result = download(reader, tmp_path / "x.part", options=options)
    assert result.sha256 == sha(data)
    assert reader.opened[0] == (0, 2 * MiB)
    assert len(reader.opened) > 2  # it tried parallel ranges...
    assert reader.opened[-1][1] is None  # ...and read the rest as one stream
    assert result.fetched == len(data)


def test_ranges_refused_after_a_split_fall_back_to_one_stream(tmp_path: Path) -> None:
    data = make_payload(3 * MiB)
    reader = SlowReader(data, rate=4 * MiB, honest=1)  # only the first answer is ranged
    options = replace(FAST, connections=4, chunk_size=256 * 1024)
    result = download(reader, tmp_path / "x.part", options=options)
    assert result.sha256 == sha(data)
    assert (tmp_path / "x.part").read_bytes() == data
    assert len(reader.opened) > 2  # it did split...
    assert reader.opened[-1][1] is None  # ...and ended as one stream


def test_a_longer_stale_part_file_is_cut_to_the_new_size(tmp_path: Path) -> None:
    data = make_payload(MiB)
    part = tmp_path / "x.part"
    part.write_bytes(make_payload(3 * MiB, seed=9))  # an older, longer file, no resume state
    assert download(MemoryReader(data), part, options=FAST).sha256 == sha(data)
    assert part.read_bytes() == data


def test_resume_state_is_kept_beside_the_part_file(tmp_path: Path) -> None:
    data = make_payload(2 * MiB)
    part = tmp_path / "x.part"
    reader = MemoryReader(data, fail_at=10**12)
    download(reader, part, options=replace(FAST, connections=1))
    frontier, etag, size = read_resume_state(part)
    assert (frontier, etag, size) == (len(data), '"v1"', len(data))

    # the whole file is already there: nothing is asked of the origin again
    again = MemoryReader(data)
    result = download(again, part, options=FAST)
    assert again.opened == []
    assert result.sha256 == sha(data)
    assert result.fetched == 0


def test_a_part_file_shorter_than_its_state_starts_over(tmp_path: Path) -> None:
    data = make_payload(MiB)
    part = tmp_path / "x.part"
    download(MemoryReader(data), part, options=FAST)
    with open(part, "r+b") as handle:
        handle.truncate(1000)
    assert read_resume_state(part) == (0, None, None)
    reader = MemoryReader(data)
    assert download(reader, part, options=FAST).sha256 == sha(data)
    assert reader.opened[0][0] == 0


def test_fatal_errors_are_not_retried(tmp_path: Path) -> None:
    class Refusing(MemoryReader):
        def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
            self.opened.append((start, end))
            raise FatalError("refused (HTTP 403)", 403)

    reader = Refusing(b"")
    with pytest.raises(FatalError, match="403"):
        download(reader, tmp_path / "x.part", options=FAST)
    assert len(reader.opened) == 1


def test_the_deadline_bounds_a_failing_origin(tmp_path: Path) -> None:
    class Failing(MemoryReader):
        def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
            raise TransientError("HTTP 503", retry_after=0.2)

    options = TransferOptions(retries=1000, backoff=0.05, deadline=1.0)
    started = time.monotonic()
    with pytest.raises(FatalError, match="gave up"):
        download(Failing(b""), tmp_path / "x.part", options=options)
    assert time.monotonic() - started < 3.0


def test_defaults_retry_at_least_three_times_within_about_a_minute() -> None:
    options = TransferOptions()
    assert options.retries >= 3
    worst = sum(
        min(options.max_backoff, options.backoff * 2**n) * 1.5 for n in range(options.retries)
    )
    assert worst < 60
    assert options.deadline <= 60


def test_cancel_stops_a_download_and_keeps_its_bytes_for_later(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(16 * MiB)
    url = model_server.add("slow.bin", data)
    model_server.set_rate("slow.bin", 2 * MiB)
    cancel = threading.Event()

    def stop_midway(done: int, total: int | None) -> None:
        if done >= 2 * MiB:
            cancel.set()

    options = replace(FAST, connections=1)
    started = time.monotonic()
    with pytest.raises(SourceError, match="cancelled"):
        Cache(modelcache_home, transfer=options).fetch(url, progress=stop_midway, cancel=cancel)
    assert time.monotonic() - started < 6.0  # the whole file takes 8 s at this rate
    model_server.set_rate("slow.bin", None)
    model_server.reset_counts()
    assert Cache(modelcache_home, transfer=options).fetch(url).read_bytes() == data
    assert model_server.count("slow.bin")[1] <= len(data) - 2 * MiB


def test_http_reader_reads_ranges(model_server: ModelServer) -> None:
    data = make_payload(100_000)
    url = model_server.add("r.bin", data)
    reader = HTTPReader(Source.parse(url), replace(FAST, piece_size=4096))
    stream = reader.open(1000, 2000, None)
    body = b"".join(stream.pieces)
    assert (stream.start, stream.size, stream.ranged) == (1000, len(data), True)
    assert body == data[1000:2000]
    whole = reader.open(0, None, None)
    assert hashlib.sha256(b"".join(whole.pieces)).hexdigest() == sha(data)
    assert max(len(p) for p in reader.open(0, None, None).pieces) <= 4096
    # asking past the end of a complete file is not an error
    end = reader.open(len(data), None, None)
    assert (end.start, end.size, list(end.pieces)) == (len(data), len(data), [])
