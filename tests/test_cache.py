"""The cache against a real HTTP origin on 127.0.0.1, with real faults and real processes."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import (
    FAST,
    KiB,
    MiB,
    asked_ranges,
    code_blocks,
    kill_at,
    make_payload,
    part_frontier,
    run_python_blocks,
    sha,
    tiles,
    wait_for,
)

from modelcache import (
    Cache,
    InsufficientSpaceError,
    IntegrityError,
    LockTimeoutError,
    ModelCacheError,
    NotCachedError,
    SourceError,
    TransferOptions,
)
from modelcache.testing import ModelServer

# ---------------------------------------------------------------------------------------------
# basics


def test_fetch_downloads_once_then_hits_without_network(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(3 * MiB + 17)
    url = model_server.add("model.safetensors", data)

    first = cache.fetch_details(url)
    assert not first.cache_hit
    assert first.path.name == "model.safetensors"
    assert first.path.read_bytes() == data
    assert first.sha256 == sha(data)
    assert first.size == len(data)

    model_server.reset_counts()
    again = Cache(cache.path, read_only_paths=[], offline=False).fetch_details(url)
    assert again.cache_hit
    assert again.path == first.path
    assert model_server.count("model.safetensors") == (0, 0)


def test_warm_start_needs_no_origin_at_all(modelcache_home: Path) -> None:
    data = make_payload(MiB)
    with ModelServer() as server:
        url = server.add("w.bin", data)
        Cache().fetch(url, sha(data))
    # the origin is gone: a warm start must not even try to connect
    assert Cache().fetch(url, sha(data)).read_bytes() == data


def test_the_bytes_are_stored_once_under_their_sha256(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(1000)
    url = model_server.add("k.bin", data)
    path = cache.fetch(url, sha256=sha(data).upper())
    (entry,) = cache.entries()
    assert entry.sha256 == sha(data)
    assert entry.path == path
    blob = cache.path / "blobs" / sha(data)
    assert blob.read_bytes() == data
    assert os.path.samefile(path, blob)  # the entry's file is the blob, not a copy
    assert [p.name for p in (cache.path / "blobs").iterdir()] == [sha(data)]


def test_entries_describe_every_entry(cache: Cache, model_server: ModelServer) -> None:
    a, b = make_payload(1000, 1), make_payload(2000, 2)
    url_a = model_server.add("a.pt", a)
    url_b = model_server.add("b.pt", b)
    cache.fetch(url_a)
    cache.fetch(url_b, sha(b))
    entries = {e.source: e for e in cache.entries()}
    assert set(entries) == {url_a, url_b}
    assert entries[url_a].size == 1000
    assert entries[url_a].sha256 == sha(a)  # computed while writing, none was given
    assert entries[url_b].sha256 == sha(b)
    assert entries[url_b].path.read_bytes() == b
    for entry in entries.values():
        assert time.time() - entry.last_used < 60
        assert json.loads(json.dumps(entry.to_dict()))["key"] == entry.key
    meta = json.loads((entries[url_b].path.parent / "meta.json").read_text())
    assert meta["sha256"] == sha(b)
    assert meta["source"] == url_b
    assert meta["etag"]


def test_progress_callback_reports_bytes_done_and_total(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(5 * MiB + 3)
    url = model_server.add("p.bin", data)
    seen: list[tuple[int, int | None]] = []
    cache.fetch(url, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(data), len(data))
    dones = [done for done, _ in seen]
    assert dones == sorted(dones)


def test_progress_of_a_slow_download_moves_every_fraction_of_a_second(
    cache: Cache, model_server: ModelServer
) -> None:
    """At 64 KiB/s one 256 KiB buffer would take 4 s to fill: the reads return sooner."""
    data = make_payload(192 * KiB)
    url = model_server.add("slow.bin", data)
    model_server.set_rate("slow.bin", 64 * KiB)
    began = time.monotonic()
    times: list[float] = []
    cache.fetch(url, sha(data), progress=lambda done, total: times.append(time.monotonic()))
    assert times[-1] - began > 2  # the rate held
    gaps = [later - earlier for earlier, later in zip([began, *times], times, strict=False)]
    assert max(gaps) < 1.0, gaps


def test_local_paths_are_used_in_place(cache: Cache, tmp_path: Path) -> None:
    data = make_payload(4096)
    local = tmp_path / "weights.bin"
    local.write_bytes(data)
    assert cache.fetch(local) == local
    assert cache.fetch(local.as_uri(), sha(data)) == local
    assert cache.entries() == []
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.fetch(local, "0" * 64)
    with pytest.raises(SourceError, match="no such file"):
        cache.fetch(tmp_path / "missing.bin", model="m")


def test_unknown_scheme_is_a_source_error(cache: Cache) -> None:
    with pytest.raises(SourceError, match="unknown scheme"):
        cache.fetch("nosuchscheme://bucket/model.bin")


@pytest.mark.parametrize("size", [0, 1])
def test_tiny_files(cache: Cache, model_server: ModelServer, size: int) -> None:
    data = make_payload(size)
    url = model_server.add(f"tiny{size}.bin", data)
    assert cache.fetch(url, sha(data)).read_bytes() == data


# ---------------------------------------------------------------------------------------------
# parallel ranged downloads


def test_fast_origin_is_read_as_one_stream(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(12 * MiB)
    url = model_server.add("fast.bin", data)
    # "fast" is relative: well above what a loaded 2-core CI machine still serves locally
    options = replace(FAST, connections=8, chunk_size=512 * 1024, split_below=8 * MiB)
    got = Cache(modelcache_home, transfer=options).fetch_details(url, sha(data))
    assert got.path.read_bytes() == data
    # the first 8 chunks, timed over the first one; fast: the rest as one more request
    ranges = [h.get("Range") for _, h in model_server.request_headers]
    assert ranges == [f"bytes=0-{4 * MiB - 1}", f"bytes={4 * MiB}-"]
    assert model_server.count("fast.bin") == (2, len(data))


def test_slow_single_stream_is_split_into_parallel_ranges(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(12 * MiB)
    url = model_server.add("capped.bin", data)
    model_server.set_rate("capped.bin", 3 * MiB)  # per connection, like a CDN
    seen: list[int] = []
    options = replace(FAST, connections=4, chunk_size=512 * 1024)
    got = Cache(modelcache_home, transfer=options).fetch_details(
        url, sha(data), progress=lambda done, total: seen.append(done)
    )
    assert got.path.read_bytes() == data
    _, sent = model_server.count("capped.bin")
    # the first 8 chunks, timed over the first one: too slow, so it is read on to its end
    # while the rest is asked for chunk by chunk (the last ones a quarter chunk each)
    assert model_server.request_headers[0][1]["Range"] == f"bytes=0-{4 * MiB - 1}"
    asked = asked_ranges(model_server, len(data))
    assert tiles(asked, 0, len(data))
    assert max(end - start for start, end in asked[1:]) == 512 * 1024
    assert asked[-1] == (len(data) - 128 * 1024, len(data))
    assert sent == len(data)  # no byte twice
    assert seen == sorted(seen)
    assert seen[-1] == len(data)


def test_split_below_zero_keeps_one_stream_however_slow(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(3 * MiB)
    url = model_server.add("one.bin", data)
    model_server.set_rate("one.bin", 4 * MiB)
    options = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=0)
    assert Cache(modelcache_home, transfer=options).fetch(url, sha(data)).read_bytes() == data
    assert model_server.count("one.bin") == (1, len(data))


def test_large_file_is_fetched_as_parallel_ranges(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(10 * MiB + 12345)
    url = model_server.add("big.bin", data)
    options = replace(
        FAST, connections=4, chunk_size=MiB, piece_size=256 * 1024, split_below=math.inf
    )
    cache = Cache(modelcache_home, transfer=options)
    got = cache.fetch_details(url, sha(data))
    assert got.path.read_bytes() == data
    _, sent = model_server.count("big.bin")
    assert sent == len(data)
    asked = asked_ranges(model_server, len(data))  # chunk by chunk from the first byte
    assert tiles(asked, 0, len(data))
    assert asked[0] == (0, MiB)
    assert max(end - start for start, end in asked) == MiB


def test_origin_ignoring_range_is_read_as_one_stream(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(6 * MiB + 1)
    url = model_server.add("norange.bin", data)
    model_server.set_ignore_range("norange.bin")
    cache = Cache(modelcache_home, transfer=replace(FAST, connections=4, chunk_size=MiB))
    assert cache.fetch(url, sha(data)).read_bytes() == data
    assert model_server.count("norange.bin") == (1, len(data))


def test_origin_ignoring_range_resumes_from_zero(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(4 * MiB)
    url = model_server.add("norange.bin", data)
    model_server.set_ignore_range("norange.bin")
    model_server.cut_after("norange.bin", MiB)
    cache = Cache(modelcache_home, transfer=replace(FAST, connections=4, chunk_size=MiB))
    assert cache.fetch(url, sha(data)).read_bytes() == data
    assert model_server.count("norange.bin") == (2, MiB + len(data))


# ---------------------------------------------------------------------------------------------
# one download per entry


def test_threads_and_processes_on_one_cold_entry_download_it_once(
    modelcache_home: Path, model_server: ModelServer, spawn, tmp_path: Path
) -> None:
    data = make_payload(8 * MiB)
    url = model_server.add("shared.bin", data)
    model_server.set_rate("shared.bin", 4 * MiB)  # about a second with 2 connections
    options = replace(FAST, connections=2, chunk_size=MiB, split_below=math.inf)
    go = tmp_path / "go"
    workers = [
        spawn(modelcache_home, url, options, ready=str(tmp_path / f"ready{n}"), go=str(go))
        for n in range(6)
    ]
    wait_for(lambda: all((tmp_path / f"ready{n}").exists() for n in range(6)), what="workers")
    cache = Cache(modelcache_home, transfer=options)
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(cache.fetch(url))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    go.touch()
    for thread in threads:
        thread.start()
    answers = [worker.result() for worker in workers]
    for thread in threads:
        thread.join()
    assert errors == []
    paths = {Path(a["path"]) for a in answers} | set(results)
    assert len(paths) == 1
    assert paths.pop().read_bytes() == data
    _, sent = model_server.count("shared.bin")
    assert sent == len(data)
    assert tiles(asked_ranges(model_server, len(data)), 0, len(data))  # no duplicate download
    assert len(cache.entries()) == 1


def test_a_lock_held_by_a_killed_process_does_not_block(
    modelcache_home: Path, model_server: ModelServer, spawn
) -> None:
    data = make_payload(4 * MiB)
    url = model_server.add("locked.bin", data)
    model_server.set_rate("locked.bin", 256 * 1024)
    worker = spawn(modelcache_home, url, replace(FAST, connections=1))
    wait_for(lambda: model_server.count("locked.bin")[1] > 0, what="the download to start")
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    model_server.set_rate("locked.bin", None)
    started = time.monotonic()
    path = Cache(modelcache_home, transfer=FAST, lock_timeout=300).fetch(url, sha(data))
    assert path.read_bytes() == data
    assert time.monotonic() - started < 10


def test_a_stuck_writer_makes_waiters_time_out(
    modelcache_home: Path, model_server: ModelServer, spawn
) -> None:
    data = make_payload(MiB)
    url = model_server.add("stuck.bin", data)
    model_server.set_delay("stuck.bin", 60.0)  # the writer gets no byte: it makes no progress
    spawn(modelcache_home, url, replace(FAST, stall_timeout=120.0))
    wait_for(lambda: model_server.count("stuck.bin")[0] >= 1, what="the writer's request")
    cache = Cache(modelcache_home, transfer=FAST, lock_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(LockTimeoutError) as caught:
        cache.fetch(url, model="stuck-model")
    assert 1.0 <= time.monotonic() - started < 10
    assert isinstance(caught.value, TimeoutError)
    assert "stuck-model" in str(caught.value)
    assert url in str(caught.value)


def test_cancel_stops_a_wait_on_another_writers_lock(
    modelcache_home: Path, model_server: ModelServer, spawn
) -> None:
    # Registry.close() must not hang behind another process's download
    data = make_payload(MiB)
    url = model_server.add("held.bin", data)
    model_server.set_delay("held.bin", 60.0)
    spawn(modelcache_home, url, replace(FAST, stall_timeout=120.0))
    wait_for(lambda: model_server.count("held.bin")[0] >= 1, what="the writer's request")
    cancel = threading.Event()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            Cache(modelcache_home, transfer=FAST).fetch(url, model="held", cancel=cancel)
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # waiting on the lock
    cancel.set()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], SourceError)
    assert "cancelled" in str(errors[0])
    assert "held" in str(errors[0])


# ---------------------------------------------------------------------------------------------
# resume


def test_sigkill_mid_download_then_resume_refetches_little(
    modelcache_home: Path, model_server: ModelServer, spawn
) -> None:
    data = make_payload(16 * MiB)
    url = model_server.add("resume.bin", data)
    model_server.set_rate("resume.bin", 4 * MiB)
    options = replace(FAST, connections=2, chunk_size=MiB)
    worker = spawn(modelcache_home, url, options, sha256=sha(data))
    half = lambda: part_frontier(modelcache_home) >= len(data) // 2  # noqa: E731
    kill_at(worker, half, "half the file", model_server, "resume.bin")
    assert Cache(modelcache_home).entries() == []  # nothing half-written is visible

    model_server.set_rate("resume.bin", None)
    model_server.reset_counts()
    kept = part_frontier(modelcache_home)  # what the range map vouches for
    assert kept >= len(data) // 2
    got = Cache(modelcache_home, transfer=options).fetch_details(url, sha(data))
    assert got.path.read_bytes() == data
    _, sent = model_server.count("resume.bin")
    assert sent == len(data) - kept  # every missing byte once, however the rest was fetched
    assert not list((modelcache_home / ".tmp").glob("*.part*"))


@pytest.mark.parametrize("connections", [1, 3])
def test_connection_cut_mid_body_is_resumed(
    modelcache_home: Path, model_server: ModelServer, connections: int
) -> None:
    data = make_payload(6 * MiB)
    url = model_server.add("cut.bin", data)
    model_server.cut_after("cut.bin", MiB + 1000)
    options = replace(FAST, connections=connections, chunk_size=2 * MiB)
    path = Cache(modelcache_home, transfer=options).fetch(url, sha(data))
    assert path.read_bytes() == data
    _, sent = model_server.count("cut.bin")
    assert sent == len(data)  # the bytes before the cut were kept, not fetched again
    resumed = [h.get("Range", "") for _, h in model_server.request_headers]
    assert f"bytes={MiB + 1000}-" in " ".join(resumed)


def test_file_changed_at_origin_between_attempts_restarts_cleanly(
    modelcache_home: Path, model_server: ModelServer, spawn
) -> None:
    old, new = make_payload(8 * MiB, 1), make_payload(8 * MiB, 2)
    url = model_server.add("changing.bin", old)
    model_server.set_rate("changing.bin", 2 * MiB)
    worker = spawn(modelcache_home, url, replace(FAST, connections=1, chunk_size=MiB))
    wait_for(lambda: part_frontier(modelcache_home) >= 2 * MiB, what="part of the old file")
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)

    model_server.add("changing.bin", new)  # a new version, a new ETag
    model_server.set_rate("changing.bin", None)
    model_server.reset_counts()
    got = Cache(modelcache_home, transfer=FAST).fetch_details(url)
    assert got.path.read_bytes() == new
    assert got.sha256 == sha(new)
    if_range = [h.get("If-Range") for _, h in model_server.request_headers]
    assert if_range[0]  # the resume asked for the old version only


def test_file_changed_during_a_parallel_download_restarts_cleanly(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    old, new = make_payload(8 * MiB, 3), make_payload(8 * MiB, 4)
    url = model_server.add("swap.bin", old)
    swapped = threading.Event()

    def swap(done: int, total: int | None) -> None:
        if done >= 2 * MiB and not swapped.is_set():
            swapped.set()
            model_server.add("swap.bin", new)

    options = replace(FAST, connections=2, chunk_size=MiB, split_below=math.inf)
    model_server.set_rate("swap.bin", 4 * MiB)
    got = Cache(modelcache_home, transfer=options).fetch_details(url, progress=swap)
    assert swapped.is_set()
    assert got.path.read_bytes() == new
    assert got.sha256 == sha(new)


# ---------------------------------------------------------------------------------------------
# retries and refusals


def test_server_errors_end_in_source_error_after_retries(
    cache: Cache, model_server: ModelServer
) -> None:
    url = model_server.add("broken.bin", make_payload(1000))
    model_server.fail_next("broken.bin", times=100, status=500)
    with pytest.raises(SourceError) as caught:
        cache.fetch(url, model="broken-model")
    assert model_server.count("broken.bin")[0] == FAST.retries + 1
    message = str(caught.value)
    assert "broken-model" in message
    assert url in message
    assert "500" in message
    assert cache.entries() == []


def test_transient_errors_are_retried_then_succeed(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(MiB)
    url = model_server.add("flaky.bin", data)
    model_server.fail_next("flaky.bin", times=2, status=503)
    assert cache.fetch(url, sha(data)).read_bytes() == data
    assert model_server.count("flaky.bin")[0] == 3


def test_retry_after_is_honoured(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(1000)
    url = model_server.add("busy.bin", data)
    model_server.fail_next("busy.bin", times=1, status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    assert cache.fetch(url).read_bytes() == data
    assert time.monotonic() - started >= 0.95  # FAST's own backoff is 0.01 s


@pytest.mark.parametrize("status", [401, 403, 404])
def test_no_retry_on_refusal_or_not_found(
    cache: Cache, model_server: ModelServer, status: int
) -> None:
    url = model_server.add("refused.bin", make_payload(1000))
    model_server.fail_next("refused.bin", times=10, status=status)
    with pytest.raises(SourceError) as caught:
        cache.fetch(url)
    assert caught.value.status == status
    assert model_server.count("refused.bin")[0] == 1


def test_a_stall_is_retried(modelcache_home: Path, model_server: ModelServer) -> None:
    data = make_payload(MiB)
    url = model_server.add("stall.bin", data)
    model_server.set_delay("stall.bin", 6.0)

    def undelay() -> None:
        wait_for(lambda: model_server.count("stall.bin")[0] >= 1, what="the first request")
        model_server.set_delay("stall.bin", 0)

    helper = threading.Thread(target=undelay)
    helper.start()
    cache = Cache(modelcache_home, transfer=replace(FAST, stall_timeout=1.0))
    started = time.monotonic()
    assert cache.fetch(url).read_bytes() == data
    helper.join()
    assert time.monotonic() - started < 6.0  # the first answer never came
    assert model_server.count("stall.bin")[0] >= 2


def test_unreachable_origin_is_a_source_error(cache: Cache) -> None:
    with pytest.raises(SourceError):
        cache.fetch("http://127.0.0.1:9/nothing-listens-here.bin")


# ---------------------------------------------------------------------------------------------
# mirrors


def test_mirrors_are_tried_in_order(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(MiB)
    missing = model_server.url + "/missing.bin"
    broken = model_server.add("broken.bin", data)
    model_server.fail_next("broken.bin", times=100, status=502)
    good = model_server.add("good.bin", data)
    assert cache.fetch([missing, broken, good], sha(data)).read_bytes() == data
    order = [path for path, _ in model_server.request_headers]
    assert order[0] == "/missing.bin"
    assert order[1 : 1 + FAST.retries + 1] == ["/broken.bin"] * (FAST.retries + 1)
    assert set(order[FAST.retries + 2 :]) == {"/good.bin"}


def test_all_mirrors_failing_lists_every_attempt(cache: Cache, model_server: ModelServer) -> None:
    missing = model_server.url + "/missing.bin"
    refused = model_server.add("refused.bin", b"x")
    model_server.fail_next("refused.bin", times=10, status=403)
    with pytest.raises(SourceError) as caught:
        cache.fetch([missing, refused], model="mirrored")
    error = caught.value
    assert [src for src, _ in error.attempts] == [missing, refused]
    assert "404" in error.attempts[0][1]
    assert "403" in error.attempts[1][1]
    assert "mirrored" in str(error)
    assert missing in str(error)
    assert refused in str(error)


def test_a_mirror_hit_in_the_cache_wins_over_the_network(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(1000)
    first = model_server.add("first.bin", data)
    second = model_server.add("second.bin", data)
    cache.fetch(second)
    model_server.reset_counts()
    assert cache.fetch([first, second]).read_bytes() == data
    assert model_server.request_headers == []


# ---------------------------------------------------------------------------------------------
# integrity


def test_wrong_sha256_is_an_integrity_error_and_caches_nothing(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(2 * MiB)
    url = model_server.add("bad.bin", data)
    with pytest.raises(IntegrityError) as caught:
        cache.fetch(url, "ab" * 32, model="bad-model")
    assert "bad-model" in str(caught.value)
    assert cache.entries() == []
    assert not [p for p in (cache.path / ".tmp").iterdir()]
    assert cache.lookup(url, "ab" * 32) is None
    # the right digest still works afterwards
    assert cache.fetch(url, sha(data)).read_bytes() == data


def test_malformed_sha256_is_a_value_error(cache: Cache, model_server: ModelServer) -> None:
    url = model_server.add("x.bin", b"x")
    with pytest.raises(ValueError, match="64 hex"):
        cache.fetch(url, "not-a-digest")


def _flip_byte(path: Path, offset: int, keep_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_reports_a_flipped_byte(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(MiB)
    url = model_server.add("v.bin", data)
    path = cache.fetch(url, sha(data))
    assert cache.verify() == []
    _flip_byte(path, 12345, keep_mtime=True)  # the stamp cannot tell; only re-hashing can
    problems = cache.verify()
    assert len(problems) == 1
    assert sha(data)[:16] in problems[0]
    assert "sha256" in problems[0]


def test_warm_fetch_rehashes_a_file_whose_stamp_changed(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(MiB)
    url = model_server.add("w.bin", data)
    path = cache.fetch(url, sha(data))
    model_server.reset_counts()

    os.utime(path, None)  # touched, same bytes: re-hashed, trusted again, no network
    assert cache.fetch(url, sha(data)).read_bytes() == data
    assert model_server.count("w.bin") == (0, 0)

    _flip_byte(path, 7, keep_mtime=False)  # corrupt: re-hashed, found bad, fetched again
    assert cache.fetch(url, sha(data)).read_bytes() == data
    assert model_server.count("w.bin")[1] == len(data)
    assert cache.verify() == []


# ---------------------------------------------------------------------------------------------
# offline and read-only layers


def test_offline_with_nothing_cached_names_the_command(
    modelcache_home: Path, monkeypatch: pytest.MonkeyPatch, model_server: ModelServer
) -> None:
    url = model_server.add("off.bin", b"data")
    monkeypatch.setenv("MODELCACHE_OFFLINE", "1")
    with pytest.raises(NotCachedError) as caught:
        Cache().fetch(url, model="off-model")
    assert f"modelcache fetch {url}" in str(caught.value)
    assert "off-model" in str(caught.value)
    assert model_server.request_headers == []
    monkeypatch.setenv("MODELCACHE_OFFLINE", "0")
    Cache().fetch(url)
    monkeypatch.setenv("MODELCACHE_OFFLINE", "true")
    assert Cache().fetch(url).read_bytes() == b"data"  # offline, but cached
    assert model_server.count("off.bin")[0] == 1


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_read_only_layer_is_used_first_and_never_written(
    tmp_path: Path, modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(MiB)
    url = model_server.add("layer.bin", data)
    baked = tmp_path / "baked"
    Cache(baked, read_only_paths=[]).fetch(url, sha(data))
    # make the layer look like an image layer: a new stamp for every file
    for path in baked.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    before = _snapshot(baked)
    model_server.reset_counts()

    cache = Cache(modelcache_home, read_only_paths=[baked], transfer=FAST)
    for _ in range(2):
        got = cache.fetch_details(url, sha(data))
        assert got.cache_hit
        assert got.path.is_relative_to(baked)
    assert [e.read_only for e in cache.entries()] == [True]
    assert cache.verify() == []
    assert model_server.request_headers == []
    with pytest.raises(KeyError):
        cache.remove(sha(data))
    assert cache.prune(0) == []
    assert _snapshot(baked) == before


def test_corrupt_read_only_entry_is_fetched_into_the_writable_cache(
    tmp_path: Path, modelcache_home: Path, model_server: ModelServer
) -> None:
    data = make_payload(MiB)
    url = model_server.add("layer.bin", data)
    baked = tmp_path / "baked"
    path = Cache(baked, read_only_paths=[]).fetch(url, sha(data))
    _flip_byte(path, 99, keep_mtime=False)
    before = _snapshot(baked)
    cache = Cache(modelcache_home, read_only_paths=[baked], transfer=FAST)
    got = cache.fetch(url, sha(data))
    assert got.is_relative_to(modelcache_home)
    assert got.read_bytes() == data
    assert _snapshot(baked) == before
    assert len(cache.verify()) == 1  # the layer's entry is reported, not repaired


def test_read_only_paths_from_the_environment(
    tmp_path: Path,
    modelcache_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    model_server: ModelServer,
) -> None:
    data = make_payload(1000)
    url = model_server.add("env.bin", data)
    baked = tmp_path / "baked"
    Cache(baked, read_only_paths=[]).fetch(url)
    monkeypatch.setenv("MODELCACHE_READ_ONLY_PATHS", f"{tmp_path / 'nothing'}{os.pathsep}{baked}")
    model_server.reset_counts()
    assert Cache().fetch(url).is_relative_to(baked)
    assert model_server.request_headers == []


# ---------------------------------------------------------------------------------------------
# secrets


SECRET_URL_PARTS = ("hunter2pass", "s3cr3tsignature", "AKIAEXAMPLEKEY")


def _secret_url(server: ModelServer, name: str) -> str:
    base = server.url.replace("http://", "http://alice:hunter2pass@")
    return (
        f"{base}/{name}?X-Amz-Signature=s3cr3tsignature"
        f"&X-Amz-Credential=AKIAEXAMPLEKEY&X-Amz-Expires=3600"
    )


def _assert_clean(text: str) -> None:
    for secret in SECRET_URL_PARTS:
        assert secret not in text


def test_credentials_never_leak(
    cache: Cache, model_server: ModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data = make_payload(MiB)
    model_server.add("secret.bin", data)
    url = _secret_url(model_server, "secret.bin")

    model_server.fail_next("secret.bin", times=1, status=503)
    got = cache.fetch_details(url, model="secret-model")
    assert got.path.read_bytes() == data
    # the credentials did reach the origin
    assert any("Authorization" in h for _, h in model_server.request_headers)
    _assert_clean(got.source)
    _assert_clean(repr(got))
    for entry in cache.entries():
        _assert_clean(repr(entry))
        _assert_clean(json.dumps(entry.to_dict()))
    for meta in cache.path.rglob("meta.json"):
        _assert_clean(meta.read_text())
    # the same URL signed again is the same entry
    resigned = url.replace("s3cr3tsignature", "0th3rsignature")
    assert cache.fetch_details(resigned).cache_hit

    errors: list[BaseException] = []
    for status in (403, 404, 500):
        model_server.fail_next("missing.bin", times=10, status=status)
        with pytest.raises(SourceError) as caught:
            cache.fetch(_secret_url(model_server, "missing.bin"), model="secret-model")
        errors.append(caught.value)
    with pytest.raises(SourceError) as caught:
        cache.fetch(url.replace(str(model_server.url.rsplit(":", 1)[1]), "9"), model="x")
    errors.append(caught.value)
    with pytest.raises(IntegrityError) as caught_integrity:
        cache.fetch(url, "cd" * 32)
    errors.append(caught_integrity.value)
    with pytest.raises(SourceError) as caught:
        cache.fetch([_secret_url(model_server, "missing.bin"), url.replace("http", "nope")])
    errors.append(caught.value)
    for error in errors:
        _assert_clean(str(error))
        _assert_clean(repr(error))
        _assert_clean(repr(error.__dict__))
        _assert_clean(str(pickle.loads(pickle.dumps(error))))
        assert error.__cause__ is None or not any(
            s in str(error.__cause__) for s in SECRET_URL_PARTS
        )
    _assert_clean(caplog.text)
    assert "downloading" in caplog.text  # the log did talk about the URL, redacted


def test_offline_error_does_not_leak_credentials(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    url = _secret_url(model_server, "secret.bin")
    with pytest.raises(NotCachedError) as caught:
        Cache(offline=True).fetch(url)
    _assert_clean(str(caught.value))
    assert "modelcache fetch" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# disk space


def test_insufficient_space_is_a_clear_error(tmp_path: Path, model_server: ModelServer) -> None:
    """A real small filesystem: a 4 MiB tmpfs mounted in a private mount namespace."""
    url = model_server.add("huge.bin", make_payload(32 * MiB))
    home = tmp_path / "small-disk"
    home.mkdir()
    script = (
        "import json\n"
        "from modelcache import Cache, TransferOptions\n"
        "try:\n"
        f"    Cache({str(home)!r}, read_only_paths=[]).fetch({url!r})\n"
        "    print(json.dumps({'error': None}))\n"
        "except Exception as e:\n"
        "    print(json.dumps({'error': type(e).__name__, 'message': str(e),\n"
        "                      'oserror': isinstance(e, OSError)}))\n"
    )
    command = f'mount -t tmpfs -o size=4m tmpfs {home} && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command, script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["error"] == InsufficientSpaceError.__name__
    assert "free" in answer["message"]
    assert url in answer["message"]
    assert answer["oserror"]
    assert model_server.count("huge.bin")[1] < 8 * MiB  # refused before reading the body
    assert not [p for p in home.rglob("*") if p.is_file() and p.stat().st_size]


# ---------------------------------------------------------------------------------------------
# remove and prune


def _fill(cache: Cache, server: ModelServer, names: list[str], size: int) -> dict[str, str]:
    """Fetch one file per name; the entries' keys."""
    keys = {}
    for n, name in enumerate(names):
        data = make_payload(size, n)
        key = cache.fetch_details(server.add(name, data), sha(data)).key
        assert key is not None
        keys[name] = key
        cache.release(key)
    return keys


def _set_last_used(cache: Cache, key: str, when: float) -> None:
    os.utime(cache.path / "refs" / key / "meta.json", (when, when))


def test_remove_deletes_one_entry(cache: Cache, model_server: ModelServer) -> None:
    keys = _fill(cache, model_server, ["a.bin", "b.bin"], 1000)
    cache.remove(keys["a.bin"][:12])  # a unique prefix will do
    assert [e.key for e in cache.entries()] == [keys["b.bin"]]
    with pytest.raises(KeyError):
        cache.remove(keys["a.bin"])


def test_remove_refuses_an_entry_in_use(cache: Cache, model_server: ModelServer) -> None:
    keys = _fill(cache, model_server, ["a.bin"], 1000)
    cache.lookup(model_server.url + "/a.bin")  # this process uses it again
    with pytest.raises(ModelCacheError, match="in use"):
        cache.remove(keys["a.bin"])
    cache.release(keys["a.bin"])
    cache.remove(keys["a.bin"])
    assert cache.entries() == []


def test_prune_evicts_least_recently_used_but_never_an_entry_in_use(
    cache: Cache, model_server: ModelServer, spawn, tmp_path: Path
) -> None:
    size = 10_000
    keys = _fill(cache, model_server, ["old.bin", "mid.bin", "new.bin", "used.bin"], size)
    held = tmp_path / "held"
    worker = spawn(cache.path, model_server.url + "/used.bin", hold=str(held))
    assert worker.result()["cache_hit"]
    wait_for(held.exists, what="the worker to hold its entry")
    now = time.time()
    _set_last_used(cache, keys["used.bin"], now - 4000)  # the oldest, but in use elsewhere
    _set_last_used(cache, keys["old.bin"], now - 3000)
    _set_last_used(cache, keys["mid.bin"], now - 2000)
    _set_last_used(cache, keys["new.bin"], now - 1000)

    evicted = cache.prune(2 * size)
    assert [e.key for e in evicted] == [keys["old.bin"], keys["mid.bin"]]
    assert {e.key for e in cache.entries()} == {keys["used.bin"], keys["new.bin"]}

    worker.kill()  # the user is gone: the entry may go now
    assert [e.key for e in cache.prune(0)] == [keys["used.bin"], keys["new.bin"]]
    assert cache.entries() == []


def test_a_sha256_given_later_reuses_the_entry_fetched_without_one(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(3000)
    url = model_server.add("later.bin", data)
    first = cache.fetch_details(url)
    again = cache.fetch_details(url, sha(data))
    assert again.cache_hit
    assert again.path == first.path
    assert model_server.count("later.bin")[0] == 1
    assert len(cache.entries()) == 1
    with pytest.raises(IntegrityError):  # another digest is no hit: fetched and checked
        cache.fetch(url, sha(b"something else"))
    assert model_server.count("later.bin")[0] == 2


def test_prune_keeps_entries_this_process_uses(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(1000)
    key = cache.fetch_details(model_server.add("mine.bin", data), sha(data)).key
    assert cache.prune(0) == []
    assert key is not None
    cache.release(key)
    assert len(cache.prune(0)) == 1


def test_an_evicted_entry_is_fetched_again(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(1000)
    url = model_server.add("again.bin", data)
    cache.fetch(url)
    cache.release(cache.entries()[0].key)
    cache.prune(0)
    assert cache.fetch(url).read_bytes() == data
    assert model_server.count("again.bin")[0] == 2


def test_transfer_options_are_validated() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        TransferOptions(connections=0)
    with pytest.raises(ValueError, match="retries"):
        TransferOptions(retries=-1)


# ---------------------------------------------------------------------------------------------
# configuration from the environment


def test_environment_is_read_when_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache()
    monkeypatch.setenv("MODELCACHE_HOME", str(tmp_path / "one"))
    assert cache.path == tmp_path / "one"
    monkeypatch.setenv("MODELCACHE_HOME", str(tmp_path / "two"))
    assert cache.path == tmp_path / "two"
    monkeypatch.setenv("MODELCACHE_HOME", "")  # empty counts as unset
    assert cache.path.name == "modelcache"
    assert Cache(offline=None).offline is False
    monkeypatch.setenv("MODELCACHE_OFFLINE", "yes")
    assert cache.offline is True
    assert Cache(offline=False).offline is False


def test_a_bad_switch_value_names_the_variable(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELCACHE_OFFLINE", "maybe")
    with pytest.raises(ValueError, match="MODELCACHE_OFFLINE"):
        Cache().fetch("https://models.example.com/x.bin")


def test_progress_bar_can_be_forced_on(
    cache: Cache,
    model_server: ModelServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = make_payload(MiB)
    url = model_server.add("bar.bin", data)
    monkeypatch.setenv("MODELCACHE_PROGRESS", "1")
    seen: list[int] = []
    cache.fetch(url, progress=lambda done, total: seen.append(done))
    assert seen[-1] == len(data)  # the callback still runs beside the bar
    assert "bar.bin" in capsys.readouterr().err


def test_progress_bar_can_be_switched_per_call(
    cache: Cache,
    model_server: ModelServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    quiet = model_server.add("quiet.bin", make_payload(MiB, 1))
    loud = model_server.add("loud.bin", make_payload(MiB, 2))
    monkeypatch.setenv("MODELCACHE_PROGRESS", "1")
    cache.fetch(quiet, progress_bar=False)
    assert "quiet.bin" not in capsys.readouterr().err
    monkeypatch.setenv("MODELCACHE_PROGRESS", "0")
    cache.fetch(loud, progress_bar=True)
    assert "loud.bin" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the docs pages


def _serve_docs_examples(server: ModelServer) -> None:
    server.add("tiny.safetensors", make_payload(65_640, 7))


def test_docs_cache_page_examples_run(
    model_server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve_docs_examples(model_server)
    monkeypatch.chdir(tmp_path)
    namespace = run_python_blocks("cache.md", model_server.url)
    assert isinstance(namespace["evicted"], list)
    assert (tmp_path / "image-layer").is_dir()
    assert not list((tmp_path / "empty-cache").glob("*/meta.json"))


def test_docs_cache_page_describes_the_real_layout(cache: Cache, model_server: ModelServer) -> None:
    url = model_server.add("tiny.safetensors", make_payload(1000))
    path = cache.fetch(url)
    (example,) = code_blocks("cache.md", "json")
    documented = json.loads(example)
    real = json.loads((path.parent / "meta.json").read_text())
    assert set(documented) == set(real)
    assert set(documented["files"][0]) == set(real["files"][0])
    (layout,) = code_blocks("cache.md", "text")
    for name in ("blobs", "refs", "layout.json", ".locks", ".tmp"):
        assert (cache.path / name).exists()
        assert name in layout


def test_docs_transfer_options_table_shows_the_defaults() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "cache.md").read_text()
    defaults = TransferOptions()
    documented = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and hasattr(defaults, cells[0][1:-1]):
            documented[cells[0][1:-1]] = cells[1]
    assert documented == {name: str(value) for name, value in vars(defaults).items()}


def test_docs_environment_page_lists_every_variable_and_its_example_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "environment.md").read_text()
    for name in ("HOME", "READ_ONLY_PATHS", "OFFLINE", "STRATEGY", "QUANTIZE", "PROGRESS"):
        assert f"| `MODELCACHE_{name}` |" in text
    for name in ("MODELCACHE_HOME", "MODELCACHE_READ_ONLY_PATHS", "MODELCACHE_OFFLINE"):
        monkeypatch.setenv(name, "")  # restored after the test; the example sets them
    namespace = run_python_blocks("environment.md", "unused")
    assert namespace["cache"].path == Path("/srv/models")
