"""Registry: a mapping of names to handles, readiness, start order, fetch_all and close."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, KiB, MiB, make_payload, wait_for

from modelcache import Cache, LoadError, ModelHandle, Registry, SourceError, State
from modelcache.testing import ModelServer


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def make(name: str, url: str, cache: Cache, **options: Any) -> ModelHandle:
    options.setdefault("loader", read_bytes)
    return ModelHandle(name, source=url, cache=cache, **options)


def test_behaves_like_a_read_only_mapping_of_names(cache: Cache) -> None:
    a = make("a", "https://example.com/a.bin", cache)
    b = make("b", "https://example.com/b.bin", cache)
    models = Registry([a])
    assert models.add(b) is b
    assert list(models) == ["a", "b"]
    assert len(models) == 2
    assert models["a"] is a
    assert "b" in models
    assert "c" not in models
    assert dict(models.items()) == {"a": a, "b": b}
    with pytest.raises(KeyError):
        models["c"]
    assert "a" in repr(models)


def test_names_must_be_unique(cache: Cache) -> None:
    first = make("same", "https://example.com/a.bin", cache)
    second = make("same", "https://example.com/b.bin", cache)
    with pytest.raises(ValueError, match="same"):
        Registry([first, second])
    models = Registry([first])
    with pytest.raises(ValueError, match="already registered"):
        models.add(second)
    with pytest.raises(TypeError):
        models.add("not a handle")  # type: ignore[arg-type]
    assert list(models) == ["same"]
    assert models["same"] is first


def test_readiness_counts_required_handles_only(model_server: ModelServer, cache: Cache) -> None:
    ok = make("ok", model_server.add("ok.bin", b"ok"), cache, strategy="eager")
    optional = make(
        "optional", model_server.url + "/missing.bin", cache, strategy="eager", required=False
    )
    lazy_optional = make("later", model_server.add("later.bin", b"x"), cache, required=False)
    models = Registry([ok, optional, lazy_optional])
    assert not models.ready
    models.start()  # the optional eager failure is logged, not raised
    assert models.ready
    status = models.status()
    json.dumps(status)
    assert status["ready"] is True
    assert status["models"]["ok"]["state"] == "ready"
    assert status["models"]["optional"]["state"] == "failed"
    assert "SourceError" in status["models"]["optional"]["error"]
    assert status["models"]["later"]["state"] == "not_loaded"
    assert status["models"]["later"]["required"] is False

    required = make("needed", model_server.url + "/gone.bin", cache, strategy="eager")
    models.add(required)
    assert not models.ready
    with pytest.raises(SourceError, match="'needed'"):
        models.start()
    assert not models.ready
    assert models.status()["ready"] is False
    models.close()


def test_not_ready_until_background_handles_are(model_server: ModelServer, cache: Cache) -> None:
    url = model_server.add("m.bin", make_payload(256 * KiB))
    model_server.set_rate("m.bin", 256 * KiB / 0.5)
    models = Registry([make("bg", url, cache, strategy="background")])
    models.start()  # returns before the 0.5 s download is through
    assert not models.ready
    assert models.status()["models"]["bg"]["state"] == "fetching"
    wait_for(lambda: models.ready, 10, "readiness")
    seen, direct = models.status(), dict(models["bg"].status())
    listed = dict(seen["models"]["bg"])
    # idle_s is the time since last use: two calls a moment apart differ in it (under load)
    assert 0 <= listed.pop("idle_s") <= direct.pop("idle_s")
    assert seen["ready"] is True
    assert list(seen["models"]) == ["bg"]
    assert listed == direct
    models.close()


def test_start_begins_background_handles_before_eager_ones_block(
    model_server: ModelServer, cache: Cache
) -> None:
    bg_url = model_server.add("bg.bin", b"bg")
    seen: list[State] = []

    def eager_loader(path: Path) -> bytes:
        seen.append(models["bg"].state)
        return path.read_bytes()

    models = Registry(
        [
            make(
                "eager",
                model_server.add("eager.bin", b"e"),
                cache,
                strategy="eager",
                loader=eager_loader,
            ),
            make("bg", bg_url, cache, strategy="background"),
        ]
    )
    models.start()
    assert seen
    assert seen[0] is not State.NOT_LOADED
    wait_for(lambda: models.ready, 10, "readiness")
    models.close()


def test_fetch_all_downloads_without_loading(model_server: ModelServer, cache: Cache) -> None:
    calls: list[Path] = []

    def loader(path: Path) -> bytes:
        calls.append(path)
        return path.read_bytes()

    models = Registry(
        [
            make("a", model_server.add("a.bin", b"aaa"), cache, loader=loader),
            make("b", model_server.add("b.bin", b"bbbb"), cache, loader=loader),
        ]
    )
    paths = models.fetch_all()
    assert set(paths) == {"a", "b"}
    assert Path(paths["a"]).read_bytes() == b"aaa"
    assert Path(paths["b"]).read_bytes() == b"bbbb"
    assert calls == []
    assert not models.ready
    assert {e.source for e in cache.entries()} == {
        model_server.url + "/a.bin",
        model_server.url + "/b.bin",
    }


def _modelcache_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("modelcache")]


def _part_sizes(home: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (home / ".tmp").glob("*.part")}


def test_close_during_a_throttled_download_stops_everything(
    model_server: ModelServer, cache: Cache
) -> None:
    assert _modelcache_threads() == []
    cache = Cache(cache.path, read_only_paths=[], transfer=replace(FAST, connections=2))
    size = 32 * MiB
    url = model_server.add("big.bin", make_payload(size))
    model_server.set_rate("big.bin", 4 * MiB)  # 2 connections: 4 s in all, a piece every 0.25 s
    small = model_server.add("small.bin", b"small")
    models = Registry(
        [
            make("big", url, cache, strategy="background"),
            make("small", small, cache, strategy="eager", idle_unload=60),
        ]
    )
    models.start()
    wait_for(lambda: models["big"].status()["bytes_done"] > 0, 10, "progress")
    assert models["small"].ready
    assert models["big"].state is State.FETCHING
    began = time.monotonic()
    models.close()
    assert time.monotonic() - began < 5  # it did not wait for the download
    assert _modelcache_threads() == []
    assert models["big"].state is State.UNLOADED
    assert models["small"].state is State.UNLOADED
    assert not models.ready
    # nothing half-written was published: the only entry is the small file
    assert [e.source for e in cache.entries()] == [small]
    published = [p.name for p in (cache.path / "refs").iterdir()]
    assert len(published) == 1
    assert model_server.count("big.bin")[1] < size
    parts = _part_sizes(cache.path)
    assert parts
    assert sum(parts.values()) > 0
    time.sleep(0.3)  # and nothing goes on after close() returned
    assert _modelcache_threads() == []
    assert _part_sizes(cache.path) == parts
    sent = model_server.count("big.bin")[1]

    # the handles still work afterwards: the download resumes where it stopped
    model_server.set_rate("big.bin", None)
    assert len(models["big"].get(timeout=30)) == size
    assert model_server.count("big.bin")[1] < size + sent
    models.close()
    assert _modelcache_threads() == []


def test_an_idle_unloaded_required_model_keeps_the_service_ready(
    model_server: ModelServer, cache: Cache
) -> None:
    # a readiness probe that failed here would take the pod out of the load balancer, and then
    # no request would ever come to load the model again
    url = model_server.add("m.bin", b"weights")
    h = make("m", url, cache, loader=read_bytes, idle_unload=0.5)
    models = Registry([h])
    assert not models.ready  # never loaded yet
    h.get()
    assert models.ready
    wait_for(lambda: h.state is State.UNLOADED, 10, "idle unload")
    assert models.ready
    assert models.status()["models"]["m"]["idle_unloaded"] is True
    h.unload()  # an explicit unload does take it out
    assert not models.ready
    assert h.get() == b"weights"
    assert models.ready
    models.close()


def test_an_idle_unloaded_model_that_fails_to_come_back_is_not_ready(
    model_server: ModelServer, cache: Cache
) -> None:
    url = model_server.add("m.bin", b"weights")
    calls: list[Path] = []

    def load_once(path: Path) -> bytes:
        calls.append(path)
        if len(calls) > 1:
            raise OSError("the volume went away")
        return path.read_bytes()

    h = make("m", url, cache, loader=load_once, idle_unload=0.5)
    models = Registry([h])
    h.get()
    wait_for(lambda: h.state is State.UNLOADED, 10, "idle unload")
    with pytest.raises(LoadError):
        h.get()
    assert not models.ready
    models.close()
