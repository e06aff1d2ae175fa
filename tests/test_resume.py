"""Resume of every kind of transfer: real processes killed with SIGKILL, real servers.

The origin is the project's Range-capable server on 127.0.0.1, capped per connection so a
download takes a few seconds, and its byte counter says what the next fetch asked for again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from conftest import FAST, MiB, Worker, code_blocks, kill_at, make_payload, sha, wait_for

from modelcache import Cache
from modelcache._readers import HTTPReader
from modelcache._sources import Source
from modelcache._transfer import (
    RangeStream,
    Reader,
    TransferOptions,
    discard_part,
    download,
    read_resume_state,
    resume_progress,
)
from modelcache._transfer._resume import map_path
from modelcache.testing import ModelServer

#: a split download: the first request (one chunk) measures a capped origin, the rest is
#: fetched by four connections at once
SPLIT = replace(FAST, connections=4, chunk_size=512 * 1024)
#: one stream from the first byte to the last
SINGLE = replace(FAST, connections=1)


class Watcher:
    """Polls a cache directory while downloads run: a data file outside the hidden directories
    (``.tmp``, ``.locks``, ...) that is not whole is a partial file seen at a final path."""

    def __init__(self, home: Path, data: bytes) -> None:
        self.home = home
        self.size = len(data)
        self.digest = sha(data)
        self.seen: dict[Path, str] = {}
        self.partial: list[tuple[Path, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._look()  # once more, after the last fetch returned

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self._look()

    def _look(self) -> None:
        for path in self._candidates():
            try:
                size = path.stat().st_size
                if size != self.size:
                    self.partial.append((path, size))
                elif path not in self.seen:
                    self.seen[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                continue  # removed between the listing and the look (a loser's copy)

    def _candidates(self) -> Iterator[Path]:
        for root, dirs, files in os.walk(self.home):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                # the data: blobs, and refs' links to them (not the cache's own hidden files,
                # such as a temporary copy of layout.json that a kill can leave behind)
                if not name.endswith(".json") and not name.startswith("."):
                    yield Path(root) / name


def _parts(home: Path) -> list[Path]:
    return sorted((home / ".tmp").glob("*.part"))


# ---------------------------------------------------------------------------------------------
# SIGKILL at half the file: the next fetch asks for what the range map does not vouch for


@pytest.mark.parametrize(
    ("options", "size", "rate"),
    [(SPLIT, 24 * MiB, 1 * MiB), (SINGLE, 12 * MiB, 2 * MiB)],
    ids=["split", "single-stream"],
)
def test_sigkill_at_half_then_resume_fetches_only_what_is_missing(
    modelcache_home: Path,
    model_server: ModelServer,
    spawn: Callable[..., Worker],
    options: TransferOptions,
    size: int,
    rate: int,
) -> None:
    data = make_payload(size, seed=5)
    url = model_server.add("half.bin", data)
    model_server.set_rate("half.bin", rate)  # per connection, like a CDN
    with Watcher(modelcache_home, data) as watcher:
        first = spawn(modelcache_home, url, options, sha256=sha(data))
        kill_at(
            first,
            lambda: model_server.count("half.bin")[1] >= size // 2,
            "the origin to send half the file",
            model_server,
            "half.bin",
        )
        if options.connections > 1:  # it did split: more than one range was asked for
            assert model_server.count("half.bin")[0] > 2
        assert Cache(modelcache_home).entries() == []

        model_server.set_rate("half.bin", None)
        model_server.reset_counts()
        (part,) = _parts(modelcache_home)
        kept = resume_progress(part)  # what the range map vouches for
        assert kept >= 0.4 * size
        second = spawn(modelcache_home, url, options, sha256=sha(data))
        path = Path(second.result()["path"])
    _, sent = model_server.count("half.bin")
    assert sent == size - kept  # every missing byte once, however the rest was fetched
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha(data)
    assert watcher.partial == []
    assert watcher.seen[path] == sha(data)  # the watcher did see the finished file
    assert set(watcher.seen.values()) == {sha(data)}
    assert _parts(modelcache_home) == []


# ---------------------------------------------------------------------------------------------
# out of order: ranges finished beyond a gap survive a kill

STALLED_WORKER = r"""
import json, sys, threading
from pathlib import Path
from modelcache._transfer import TransferOptions, download
from modelcache._readers import HTTPReader
from modelcache._sources import Source

args = json.loads(sys.argv[1])


class FirstRangeStalls(HTTPReader):
    # The body of the range at byte 0 never comes (a stuck connection); the others do.
    def open(self, start, end, etag):
        stream = super().open(start, end, etag)
        if start == 0:
            stream.pieces = iter(lambda: threading.Event().wait(), None)
            stream.readinto = None
        return stream


reader = FirstRangeStalls(Source.parse(args["url"]), TransferOptions(**args["options"]))
download(reader, Path(args["part"]), options=TransferOptions(**args["options"]))
"""


def test_ranges_finished_beyond_a_gap_survive_a_kill(
    tmp_path: Path, model_server: ModelServer
) -> None:
    chunk, size = MiB, 8 * MiB
    data = make_payload(size, seed=6)
    url = model_server.add("gap.bin", data)
    part = tmp_path / "gap.part"
    options = replace(FAST, connections=4, chunk_size=chunk, split_below=float("inf"))
    script = tmp_path / "stalled.py"
    script.write_text(STALLED_WORKER)
    args = {"url": url, "part": str(part), "options": asdict(options)}
    worker = subprocess.Popen(
        [sys.executable, str(script), json.dumps(args)], stderr=subprocess.PIPE, text=True
    )
    try:
        # chunk 0 stalls; the other workers finish chunks 1-7 meanwhile (the in-order hash
        # waits for chunk 0, the workers do not)
        wait_for(lambda: resume_progress(part) >= 7 * chunk, what="seven chunks past the gap")
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=10)
    assert RangeMapOnDisk(part).done == [[chunk, size]]

    model_server.reset_counts()
    reader = CountingReader(HTTPReader(Source.parse(url), options))
    result = download(reader, part, options=options)
    assert result.sha256 == sha(data)
    assert part.read_bytes() == data
    _, sent = model_server.count("gap.bin")
    assert sent == chunk  # the gap alone, nothing twice
    assert result.fetched == chunk
    assert reader.opened == [(0, chunk)]


class RangeMapOnDisk:
    """The range map file as JSON, read the way a person debugging a download would."""

    def __init__(self, part: Path) -> None:
        record = json.loads(map_path(part).read_text())
        self.done: list[list[int]] = record["done"]
        self.size: int | None = record["size"]
        self.etag: str | None = record["etag"]


class CountingReader(Reader):
    """Passes every request on to a real reader and notes which ranges were asked for."""

    def __init__(self, inner: Reader) -> None:
        self.inner = inner
        self.chunk_size = inner.chunk_size
        self.opened: list[tuple[int, int | None]] = []

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        self.opened.append((start, end))
        return self.inner.open(start, end, etag)


# ---------------------------------------------------------------------------------------------
# the validator: a file changed between the kill and the resume is fetched anew, not spliced


def test_a_new_version_after_a_kill_of_a_split_download_is_not_spliced(
    modelcache_home: Path, model_server: ModelServer, spawn: Callable[..., Worker]
) -> None:
    size = 12 * MiB
    old, new = make_payload(size, seed=7), make_payload(size, seed=8)  # same size, new ETag
    url = model_server.add("moving.bin", old)
    model_server.set_rate("moving.bin", 1 * MiB)
    worker = spawn(modelcache_home, url, SPLIT)
    kill_at(
        worker,
        lambda: sum(resume_progress(p) for p in _parts(modelcache_home)) >= size // 3,
        "a third of the old version",
        model_server,
        "moving.bin",
    )
    (part,) = _parts(modelcache_home)
    kept = RangeMapOnDisk(part)
    assert len(kept.done) >= 1
    assert kept.etag

    model_server.add("moving.bin", new)
    model_server.set_rate("moving.bin", None)
    model_server.reset_counts()
    got = Cache(modelcache_home, transfer=SPLIT).fetch_details(url)
    assert got.sha256 == sha(new)
    assert got.path.read_bytes() == new
    if_range = [h.get("If-Range") for _, h in model_server.request_headers]
    assert if_range[0] == kept.etag  # the resume asked for the old version only...
    _, sent = model_server.count("moving.bin")
    assert sent == size  # ...and got all of the new one, once


def test_a_changed_size_restarts_from_zero(tmp_path: Path, model_server: ModelServer) -> None:
    old, new = make_payload(4 * MiB, seed=9), make_payload(3 * MiB, seed=10)
    url = model_server.add("shrunk.bin", old)
    part = tmp_path / "shrunk.part"
    reader = HTTPReader(Source.parse(url), SINGLE)
    download(reader, part, options=SINGLE)
    record = json.loads(map_path(part).read_text())
    record["done"] = [[0, 2 * MiB]]  # as if killed at half, ETag forgotten
    record["etag"] = None
    map_path(part).write_text(json.dumps(record))
    model_server.add("shrunk.bin", new)
    result = download(HTTPReader(Source.parse(url), SINGLE), part, options=SINGLE)
    assert result.sha256 == sha(new)
    assert part.read_bytes() == new


# ---------------------------------------------------------------------------------------------
# the range map file itself


def test_the_range_map_is_always_whole_for_a_reader(
    tmp_path: Path, model_server: ModelServer
) -> None:
    data = make_payload(8 * MiB, seed=11)
    url = model_server.add("watched.bin", data)
    model_server.set_rate("watched.bin", 2 * MiB)
    part = tmp_path / "watched.part"
    options = replace(SPLIT, split_below=float("inf"))
    reads: list[int] = []
    broken: list[str] = []
    stop = threading.Event()

    def read_the_map() -> None:
        while not stop.is_set():
            try:
                text = map_path(part).read_text()
            except FileNotFoundError:
                continue
            finally:
                stop.wait(0.001)
            try:
                reads.append(len(json.loads(text)["done"]))
            except ValueError:
                broken.append(text)

    watcher = threading.Thread(target=read_the_map, daemon=True)
    watcher.start()
    try:
        result = download(HTTPReader(Source.parse(url), options), part, options=options)
    finally:
        stop.set()
        watcher.join()
    assert result.sha256 == sha(data)
    assert broken == []
    assert len(reads) > 10  # it was read while written, often
    assert read_resume_state(part) == (len(data), result.etag, len(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: "\x00" * len(text),  # zeros (a crash of the filesystem)
        lambda text: text.replace('"done":[[', '"done":[["x",'),  # nonsense ranges
        lambda text: json.dumps({"frontier": 123}),  # another format
        lambda text: text.replace('"boot":"', '"boot":"another-boot-'),  # written before a reboot
    ],
    ids=["truncated", "zeros", "nonsense", "other-format", "other-boot"],
)
def test_a_damaged_range_map_counts_as_empty(
    tmp_path: Path, model_server: ModelServer, damage: Callable[[str], str]
) -> None:
    data = make_payload(2 * MiB, seed=12)
    url = model_server.add("damaged.bin", data)
    part = tmp_path / "damaged.part"
    download(HTTPReader(Source.parse(url), SINGLE), part, options=SINGLE)
    assert resume_progress(part) == len(data)
    map_path(part).write_text(damage(map_path(part).read_text()))
    assert resume_progress(part) == 0

    model_server.reset_counts()
    result = download(HTTPReader(Source.parse(url), SINGLE), part, options=SINGLE)
    assert result.sha256 == sha(data)
    assert model_server.count("damaged.bin")[1] == len(data)  # fetched again, from zero
    assert resume_progress(part) == len(data)  # and recorded anew


def test_discard_part_removes_the_part_and_its_map(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"abc")
    map_path(part).write_text("{}")
    discard_part(part)
    assert list(tmp_path.iterdir()) == []


def test_the_documented_range_map_is_the_real_one(
    tmp_path: Path, model_server: ModelServer
) -> None:
    data = make_payload(MiB, seed=13)
    part = tmp_path / "doc.part"
    download(
        HTTPReader(Source.parse(model_server.add("doc.bin", data)), SINGLE), part, options=SINGLE
    )
    (example,) = code_blocks("cache.md", "js")
    documented = json.loads(example)
    real = json.loads(map_path(part).read_text())
    assert set(documented) == set(real)
    assert real["done"] == [[0, len(data)]]
    assert (real["size"], real["format"]) == (len(data), documented["format"])


#: a process whose main returns while its background handle downloads (no close())
ENDS_MID_DOWNLOAD = """
import sys, time
from modelcache import ModelHandle

url, digest, home = sys.argv[1:4]
handle = ModelHandle("weights", source=url, sha256=digest, cache=home, strategy="background")
handle.start()
while handle.status()["bytes_done"] < 1024 * 1024:
    time.sleep(0.01)
time.sleep(0.5)  # (the range map is saved every 0.25 s)
print(handle.status()["bytes_done"], flush=True)
"""


def test_a_process_that_ends_mid_download_ends_now_and_the_next_resumes(
    model_server: ModelServer, tmp_path: Path
) -> None:
    payload = make_payload(128 * MiB)
    url = model_server.add("big.bin", payload)
    model_server.set_rate("big.bin", 128 * 1024)  # a minute or more, even over 16 connections
    home = tmp_path / "home"
    ended = subprocess.run(
        [sys.executable, "-c", ENDS_MID_DOWNLOAD, url, sha(payload), str(home)],
        capture_output=True,
        text=True,
        timeout=40,  # the interpreter used to wait for the download to finish
    )
    assert ended.returncode == 0, ended.stderr
    assert int(ended.stdout) < len(payload)
    model_server.set_rate("big.bin", None)
    model_server.reset_counts()
    path = Cache(home).fetch(url, sha(payload))
    assert path.read_bytes() == payload
    _, sent = model_server.count("big.bin")
    assert sent <= len(payload) - 1024 * 1024  # what the first process got was kept
