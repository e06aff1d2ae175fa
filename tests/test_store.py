"""One copy per file: the content-addressed store, as users meet it.

Every scenario goes through the public API (handles, the CLI, ``Cache``) against a real HTTP
origin on 127.0.0.1, counting what the origin serves.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import FAST, MiB, make_payload, sha
from servers.hub import HubStandIn

from modelcache import Cache, IntegrityError, ModelCacheError, ModelHandle
from modelcache.testing import ModelServer

pytest_plugins = ["servers.fixtures"]


def _cli(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "modelcache", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _blobs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs").iterdir())


def _read(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# a source fetched with a sha256 serves it without one, and the reverse


def test_cli_fetch_with_sha256_then_handle_without_offline_and_online(
    tmp_path: Path, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_payload(2 * MiB)
    url = model_server.add("docker-build.bin", data)
    home = tmp_path / "cache"
    _cli("fetch", url, "--sha256", sha(data), "--cache", home)  # the Docker build step
    model_server.reset_counts()

    offline = ModelHandle("app", source=url, loader=_read, cache=Cache(home, offline=True))
    assert offline.get() == data
    online = ModelHandle("app2", source=url, loader=_read, cache=Cache(home, transfer=FAST))
    assert online.get() == data
    assert online.status()["cache_hit"]
    assert model_server.count("docker-build.bin") == (0, 0)


def test_read_only_layer_baked_with_a_sha256_serves_a_handle_without_one(
    tmp_path: Path, model_server: ModelServer
) -> None:
    data = make_payload(MiB)
    url = model_server.add("baked.bin", data)
    baked = tmp_path / "image-layer"
    Cache(baked, transfer=FAST).fetch(url, sha(data))
    model_server.reset_counts()

    cache = Cache(tmp_path / "volume", read_only_paths=[baked], offline=True)
    handle = ModelHandle("baked", source=url, loader=_read, cache=cache)
    assert handle.get() == data
    assert Path(handle.fetch()).is_relative_to(baked)
    assert model_server.count("baked.bin") == (0, 0)


# ---------------------------------------------------------------------------------------------
# one blob for one content, whoever names it


def test_two_mirrors_of_one_file_are_one_blob(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(MiB + 3)
    first = model_server.add("a/model.bin", data)
    second = model_server.add("b/model.bin", data)
    third = model_server.add("c/model.bin", data)
    cache.fetch(first)
    model_server.reset_counts()

    # known digest: a ref is made from the stored blob, with no request
    got = cache.fetch_details(second, sha(data))
    assert got.cache_hit
    assert model_server.count("b/model.bin") == (0, 0)
    # unknown digest: fetched (nothing says what it holds), then stored as the same blob
    cache.fetch(third)
    assert _blobs(cache.path) == [sha(data)]
    assert len(cache.entries()) == 3  # ls: one row per source fetched
    paths = [e.path for e in cache.entries()]
    assert len({os.stat(p).st_ino for p in paths}) == 1
    # offline, each mirror alone is found again
    offline = Cache(cache.path, offline=True)
    for url in (first, second, third):
        assert offline.fetch(url).read_bytes() == data


def test_a_mirror_chain_finds_a_blob_fetched_through_another_mirror(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(5000)
    origin = model_server.add("origin/w.bin", data)
    mirror = model_server.add("mirror/w.bin", data)
    cache.fetch(origin, sha(data))
    model_server.reset_counts()
    handle = ModelHandle(
        "chain", source=[mirror, origin], sha256=sha(data), loader=_read, cache=cache
    )
    assert handle.get() == data
    assert model_server.count("mirror/w.bin") == (0, 0)
    assert model_server.count("origin/w.bin") == (0, 0)


def test_removing_one_of_two_refs_keeps_the_shared_blob(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(4000)
    one = cache.fetch_details(model_server.add("one.bin", data))
    two = cache.fetch_details(model_server.add("two.bin", data), sha(data))
    for fetched in (one, two):
        assert fetched.key is not None
        cache.release(fetched.key)
    assert one.key is not None
    assert two.key is not None
    cache.remove(one.key)
    assert _blobs(cache.path) == [sha(data)]
    assert two.path.read_bytes() == data
    cache.remove(two.key)
    assert _blobs(cache.path) == []
    assert cache.entries() == []


def test_prune_counts_a_shared_blob_once(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(10_000)
    for name in ("x.bin", "y.bin"):
        fetched = cache.fetch_details(model_server.add(name, data), sha(data))
        assert fetched.key is not None
        cache.release(fetched.key)
    assert cache.prune(10_000) == []  # two refs, one blob of 10,000 bytes: within the limit
    assert len(cache.prune(0)) == 2


# ---------------------------------------------------------------------------------------------
# a sha256 that disagrees with the record


def test_a_different_sha256_given_later_is_an_integrity_error_that_changes_nothing(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(3000)
    url = model_server.add("pinned.bin", data)
    first = cache.fetch_details(url)
    before = (first.path.stat().st_ino, first.path.read_bytes())
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.fetch(url, sha(b"another version"))
    with pytest.raises(IntegrityError, match="offline"):
        Cache(cache.path, offline=True).fetch(url, sha(b"another version"))
    again = cache.fetch_details(url)
    assert again.cache_hit
    assert (again.path.stat().st_ino, again.path.read_bytes()) == before
    assert _blobs(cache.path) == [sha(data)]


def test_a_new_version_at_the_same_url_replaces_the_ref_when_its_sha256_is_given(
    cache: Cache, model_server: ModelServer
) -> None:
    old, new = make_payload(3000, 1), make_payload(3000, 2)
    url = model_server.add("latest.bin", old)
    cache.fetch(url)
    model_server.add("latest.bin", new)
    assert cache.fetch(url, sha(new)).read_bytes() == new
    assert cache.fetch(url).read_bytes() == new  # the ref now names the new version
    assert len(cache.entries()) == 1


# ---------------------------------------------------------------------------------------------
# corruption of a shared blob


def test_a_corrupt_shared_blob_is_fetched_again_for_every_ref(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(MiB)
    one = model_server.add("one/c.bin", data)
    two = model_server.add("two/c.bin", data)
    path = cache.fetch(one, sha(data))
    cache.fetch(two, sha(data))
    with open(path, "r+b") as handle:  # one flipped byte in the one copy both refs name
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    model_server.reset_counts()
    assert cache.fetch(one, sha(data)).read_bytes() == data
    assert cache.fetch(two, sha(data)).read_bytes() == data
    assert model_server.count("one/c.bin")[1] == len(data)
    assert cache.verify() == []
    assert _blobs(cache.path) == [sha(data)]


# ---------------------------------------------------------------------------------------------
# layout versions


def _layout_1_cache(root: Path) -> None:
    entry = root / ("ab" * 32)
    entry.mkdir(parents=True)
    (entry / "w.bin").write_bytes(b"old")
    meta = {"format": 1, "key": "ab" * 32, "name": "w.bin", "size": 3, "sha256": "cd" * 32}
    (entry / "meta.json").write_text(json.dumps({**meta, "files": []}))


def test_a_cache_of_another_layout_names_the_command_that_clears_it(
    tmp_path: Path, model_server: ModelServer
) -> None:
    url = model_server.add("v.bin", make_payload(1000))
    home = tmp_path / "old-cache"
    _layout_1_cache(home)
    with pytest.raises(ModelCacheError, match=r"layout 1.*modelcache clear --cache") as caught:
        Cache(home).fetch(url)
    assert str(home) in str(caught.value)
    assert (home / ("ab" * 32) / "w.bin").read_bytes() == b"old"  # nothing mixed in or lost
    assert model_server.count("v.bin") == (0, 0)

    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "layout.json").write_text('{"layout": 99}')
    with pytest.raises(ModelCacheError, match="layout 99"):
        Cache(tmp_path / "future").entries()

    cleared = _cli("clear", "--cache", home, "--json")
    assert json.loads(cleared)["removed"] == 1
    assert Cache(home).fetch(url).read_bytes() == make_payload(1000)
    assert json.loads((home / "layout.json").read_text()) == {"layout": 2}


def test_a_read_only_layer_of_another_layout_says_to_rebuild_it(tmp_path: Path) -> None:
    baked = tmp_path / "baked"
    _layout_1_cache(baked)
    with pytest.raises(ModelCacheError, match=r"layout 1.*rebuild"):
        Cache(tmp_path / "cache", read_only_paths=[baked]).entries()


# ---------------------------------------------------------------------------------------------
# a filesystem without working locks


def test_a_filesystem_without_flock_stays_correct(
    cache: Cache, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelcache import _posix

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_posix, "flock", no_locks)
    data = make_payload(3 * MiB)
    url = model_server.add("nfs.bin", data)
    results: list[bytes] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(Cache(cache.path, transfer=FAST).fetch(url, sha(data)).read_bytes())
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert results == [data] * 4  # without the guard some may download; none sees bad bytes
    assert _blobs(cache.path) == [sha(data)]
    assert len(cache.entries()) == 1
    assert cache.verify() == []
    key = cache.entries()[0].key
    cache.release(key)
    cache.remove(key)  # eviction still works (it cannot see other processes' use)
    assert cache.entries() == []


# ---------------------------------------------------------------------------------------------
# directory entries share blobs


def test_two_repos_that_share_a_file_share_its_blob(cache: Cache, hub: HubStandIn) -> None:
    weights = make_payload(2 * MiB + 5, seed=3)
    hub.push("org/base", {"model.safetensors": weights, "config.json": b'{"v": 1}'})
    hub.push("org/finetune-config", {"model.safetensors": weights, "config.json": b'{"v": 2}'})
    base = cache.fetch("hf://org/base")
    hub.clear()

    other = cache.fetch("hf://org/finetune-config")

    downloads = [path for method, path in hub.requests if "/resolve/" in path]
    assert downloads == [d for d in downloads if d.endswith("/config.json")]  # weights not again
    assert (other / "model.safetensors").read_bytes() == weights
    assert os.path.samefile(other / "model.safetensors", base / "model.safetensors")
    assert (other / "config.json").read_bytes() == b'{"v": 2}'
    assert sha(weights) in _blobs(cache.path)
    assert len(_blobs(cache.path)) == 3  # the weights once, two configs


def test_a_refresh_swaps_the_entry_in_one_step(cache: Cache, model_server: ModelServer) -> None:
    url = model_server.add("swapped.bin", make_payload(2000, 1))
    cache.fetch(url)
    (entry,) = cache.entries()
    meta = entry.path.parent / "meta.json"
    missing = 0
    done = threading.Event()

    def refresh() -> None:
        try:
            for version in range(2, 40):
                model_server.add("swapped.bin", make_payload(2000, version))
                cache.fetch_details(url, refresh=True)
        finally:
            done.set()

    worker = threading.Thread(target=refresh)
    worker.start()
    while not done.is_set():  # a reader never finds the entry gone while it is replaced
        missing += not meta.exists()
    worker.join()
    assert missing == 0
    assert cache.fetch(url).read_bytes() == make_payload(2000, 39)
    assert len(cache.entries()) == 1
