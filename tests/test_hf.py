"""hf:// sources: the real huggingface_hub client against a Hub stand-in on 127.0.0.1.

The stand-in serves the Hub's routes and headers (repo info with LFS metadata, the tree, resolve
with X-Repo-Commit / X-Linked-Etag / X-Linked-Size and a redirect to a CDN with Range support).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FAST, MiB, make_payload, sha
from servers.hub import HubStandIn

from modelcache import Cache, IntegrityError, NotCachedError, SourceError

WHISPER = {
    "config.json": b'{"alignment_heads": [[2, 2]], "lang_ids": [50259]}',
    "model.bin": make_payload(2 * MiB + 11, seed=7),
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}' * 40,
    "vocabulary.txt": b"<|endoftext|>\nhello\n",
    "README.md": b"# faster-whisper tiny\n",
    ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n",
}

pytest_plugins = ["servers.fixtures"]


def resolves(name: str) -> object:
    return lambda method, path: "/resolve/" in path and path.endswith("/" + name)


def meta_of(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path.parent / "meta.json").read_text())
    return data


def test_file_at_a_branch_records_the_commit_and_then_needs_no_network(
    cache: Cache, hub: HubStandIn
) -> None:
    commit = hub.push("Systran/faster-whisper-tiny", WHISPER)

    got = cache.fetch_details("hf://Systran/faster-whisper-tiny/model.bin")

    assert got.path.name == "model.bin"
    assert got.path.read_bytes() == WHISPER["model.bin"]
    assert meta_of(got.path)["revision"] == {"requested": None, "commit": commit}
    hub.clear()
    assert cache.fetch_details("hf://Systran/faster-whisper-tiny/model.bin").cache_hit
    assert hub.requests == []


def test_pinned_commit_starts_warm_with_the_hub_gone(modelcache_home: Path) -> None:
    with HubStandIn() as stand_in:
        commit = stand_in.push("org/sharp", {"sharp.pt": make_payload(MiB)})
        url = f"hf://org/sharp@{commit}/sharp.pt"
        Cache().fetch(url, storage_options={"hf": {"endpoint": stand_in.url}})
    # the Hub is gone: a pinned commit already cached must not even try to connect
    got = Cache().fetch_details(url, storage_options={"hf": {"endpoint": stand_in.url}})
    assert got.cache_hit
    assert got.path.read_bytes() == make_payload(MiB)


def test_a_branch_is_resolved_once_until_refreshed(cache: Cache, hub: HubStandIn) -> None:
    first = hub.push("org/m", {"w.bin": b"version one" * 200})
    url = "hf://org/m@main/w.bin"
    assert cache.fetch(url).read_bytes() == b"version one" * 200

    second = hub.push("org/m", {"w.bin": b"version two" * 200})
    hub.clear()
    kept = cache.fetch_details(url)
    assert kept.cache_hit
    assert kept.path.read_bytes() == b"version one" * 200
    assert hub.requests == []

    fresh = cache.fetch_details(url, refresh=True)
    assert fresh.path.read_bytes() == b"version two" * 200
    assert meta_of(fresh.path)["revision"] == {"requested": "main", "commit": second}
    assert first != second


def test_offline_uses_the_recorded_commit(cache: Cache, hub: HubStandIn) -> None:
    hub.push("org/m", {"w.bin": b"weights" * 300})
    cache.fetch("hf://org/m/w.bin")
    hub.push("org/m", {"w.bin": b"newer" * 300})
    hub.clear()

    offline = Cache(cache.path, read_only_paths=[], offline=True)
    assert offline.fetch("hf://org/m/w.bin").read_bytes() == b"weights" * 300
    with pytest.raises(NotCachedError, match=re.escape("modelcache fetch hf://org/m/other.bin")):
        offline.fetch("hf://org/m/other.bin")
    assert hub.requests == []


def test_hf_hub_offline_is_honoured(
    cache: Cache, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.push("org/m", {"w.bin": b"weights"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotCachedError, match="HF_HUB_OFFLINE"):
        cache.fetch("hf://org/m/w.bin", model="m")
    assert hub.count(lambda m, p: "/org/m" in p) == 0


def test_whole_repo_with_allow_patterns_is_one_directory_entry(
    cache: Cache, hub: HubStandIn
) -> None:
    hub.push("Systran/faster-whisper-tiny", WHISPER)
    url = (
        "hf://Systran/faster-whisper-tiny?include=config.json,model.bin,tokenizer.json,vocabulary.*"
    )

    got = cache.fetch_details(url)

    assert got.path.is_dir()
    assert got.path.name == "faster-whisper-tiny"
    wanted = ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    assert sorted(p.name for p in got.path.iterdir()) == wanted
    for name in wanted:
        assert (got.path / name).read_bytes() == WHISPER[name]
    records = {r["path"]: r["sha256"] for r in meta_of(got.path)["files"]}  # type: ignore[attr-defined]
    assert records == {f"faster-whisper-tiny/{n}": sha(WHISPER[n]) for n in wanted}
    assert not any(resolves(n)(m, p) for m, p in hub.requests for n in ("README.md",))


def test_subfolder_of_a_repo(cache: Cache, hub: HubStandIn) -> None:
    hub.push(
        "sentence-transformers/all-MiniLM-L6-v2",
        {
            "model.safetensors": make_payload(4000),
            "1_Pooling/config.json": b'{"word_embedding_dimension": 384}',
        },
    )
    got = cache.fetch("hf://sentence-transformers/all-MiniLM-L6-v2/1_Pooling/")
    assert got.name == "1_Pooling"
    assert [p.name for p in got.iterdir()] == ["config.json"]


def test_dataset_repos_and_tags(cache: Cache, hub: HubStandIn) -> None:
    commit = hub.push("org/calib", {"data/calib.bin": b"calibration" * 100}, repo_type="dataset")
    hub.tag("org/calib", "v1.0", commit, repo_type="dataset")
    got = cache.fetch_details("hf://datasets/org/calib@v1.0/data/calib.bin")
    assert got.path.read_bytes() == b"calibration" * 100
    assert meta_of(got.path)["revision"] == {"requested": "v1.0", "commit": commit}


def test_lfs_sha256_from_the_hub_is_checked(cache: Cache, hub: HubStandIn) -> None:
    data = make_payload(MiB, seed=3)
    hub.push("org/m", {"model.bin": data})
    hub.tamper(hashlib.sha256(data).hexdigest(), make_payload(MiB, seed=4))

    with pytest.raises(IntegrityError, match="the store says " + sha(data)):
        cache.fetch("hf://org/m/model.bin", model="m")
    assert cache.entries() == []


def test_small_files_are_checked_against_their_git_blob_id(cache: Cache, hub: HubStandIn) -> None:
    hub.push("org/m", {"config.json": b'{"a": 1}'})
    hub.tamper_small("org/m", "config.json", b'{"a": 2}')

    with pytest.raises(IntegrityError, match="git blob id"):
        cache.fetch("hf://org/m?include=config.json")
    assert cache.entries() == []


def test_private_repo_needs_a_token_which_never_leaks(cache: Cache, hub: HubStandIn) -> None:
    token = "hf_privateTokenValue123456"
    hub.push("org/private", {"w.bin": make_payload(3000)}, token=token)

    with pytest.raises(SourceError) as caught:
        cache.fetch("hf://org/private/w.bin", model="m")
    assert "token" in str(caught.value)
    assert caught.value.status in (401, 404)

    got = cache.fetch("hf://org/private/w.bin", storage_options={"hf": {"token": token}})
    assert got.read_bytes() == make_payload(3000)
    assert token not in (got.parent / "meta.json").read_text()


def test_token_from_hf_token_variable(
    cache: Cache, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.push("org/private", {"w.bin": b"w" * 2000}, token="hf_fromTheEnvironment")
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    assert cache.fetch("hf://org/private/w.bin").read_bytes() == b"w" * 2000


def test_missing_file_and_revision_are_source_errors(cache: Cache, hub: HubStandIn) -> None:
    hub.push("org/m", {"w.bin": b"w"})
    with pytest.raises(SourceError, match=re.escape("'nope.bin' not found")) as missing:
        cache.fetch("hf://org/m/nope.bin", model="m")
    assert missing.value.status == 404
    with pytest.raises(SourceError) as revision:
        cache.fetch("hf://org/m@no-such-branch/w.bin")
    assert revision.value.status == 404


def test_503_and_cut_connections_are_retried_and_resumed(cache: Cache, hub: HubStandIn) -> None:
    data = make_payload(3 * MiB, seed=5)
    hub.push("org/m", {"model.bin": data})
    hub.fail(times=2, status=503, match=lambda m, p: p.startswith("/api/"))
    hub.fail(times=1, status=502, match=resolves("model.bin"))
    hub.cut(after=MiB, times=2, match=lambda m, p: p.startswith("/lfs/"))

    started = time.monotonic()
    got = cache.fetch("hf://org/m/model.bin", sha(data))

    assert got.read_bytes() == data
    assert time.monotonic() - started < 20
    assert hub.count(lambda m, p: p.startswith("/lfs/")) == 3


def test_a_file_in_parallel_ranges_asks_the_hub_once_and_again_when_its_cdn_url_expires(
    modelcache_home: Path, hub: HubStandIn
) -> None:
    # every chunk goes to the CDN URL the Hub redirected the first request to, not through the
    # Hub again, and without the token; when the CDN refuses that URL (its signature expired),
    # the Hub is asked afresh
    data = make_payload(3 * MiB, seed=9)
    token = "hf_privateTokenValue123456"
    hub.push("org/m", {"model.bin": data}, token=token)
    cdn_requests = iter(range(1_000))
    hub.fail(
        times=1, status=403, match=lambda m, p: p.startswith("/lfs/") and next(cdn_requests) == 5
    )
    parallel = replace(FAST, split_below=math.inf, connections=4, chunk_size=256 * 1024)
    cache = Cache(modelcache_home, read_only_paths=[], offline=False, transfer=parallel)

    got = cache.fetch("hf://org/m/model.bin", sha(data), storage_options={"hf": {"token": token}})

    assert got.read_bytes() == data
    assert hub.cdn_credentials == []  # the token goes to the Hub only, never to its CDN
    chunks = hub.count(lambda m, p: m == "GET" and p.startswith("/lfs/"))
    assert chunks >= 12  # 3 MiB in 256 KiB chunks (and the one refused)
    assert hub.count(lambda m, p: m == "GET" and "/resolve/" in p) == 2


def test_the_signed_cdn_url_the_hub_redirects_to_never_reaches_logs_or_errors(
    modelcache_home: Path, hub: HubStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    # urllib3 logs the redirect, its retries and each request it makes, modelcache's reader
    # requests the signed URL itself: every one of those lines carries the CDN's signature
    caplog.set_level(logging.DEBUG)
    data = make_payload(MiB, seed=4)
    hub.push("org/m", {"model.bin": data, "gone.bin": b"g" * 4096})
    hub.cut(after=1000, times=1, match=lambda m, p: p.startswith("/lfs/"))  # a retry, logged
    parallel = replace(FAST, split_below=math.inf, connections=2, chunk_size=256 * 1024)
    cache = Cache(modelcache_home, read_only_paths=[], offline=False, transfer=parallel)

    assert cache.fetch("hf://org/m/model.bin", sha(data)).read_bytes() == data
    hub.fail(times=100, status=500, match=lambda m, p: p.startswith("/lfs/"))
    with pytest.raises(SourceError) as caught:
        cache.fetch("hf://org/m/gone.bin")

    assert "Redirecting" in caplog.text  # the lines were logged (masked)
    assert "/lfs/" in caplog.text
    for shown in (caplog.text, str(caught.value), repr(caught.value)):
        assert "cdn-secret" not in shown


def test_stand_in_is_faithful_to_huggingface_hub(hub: HubStandIn, tmp_path: Path) -> None:
    """huggingface_hub's own download and listing work against the stand-in."""
    from huggingface_hub import HfApi, hf_hub_download

    hub.push("Systran/faster-whisper-tiny", WHISPER)
    for name in ("model.bin", "config.json"):
        path = hf_hub_download(
            "Systran/faster-whisper-tiny", name, cache_dir=tmp_path, endpoint=hub.url
        )
        assert Path(path).read_bytes() == WHISPER[name]
    listed = HfApi(endpoint=hub.url).list_repo_tree("Systran/faster-whisper-tiny", recursive=True)
    assert sorted(f.path for f in listed) == sorted(WHISPER)


def test_retry_after_from_the_hub_is_honoured(cache: Cache, hub: HubStandIn) -> None:
    hub.push("org/m", {"w.bin": b"w" * 3000})
    hub.fail(times=1, status=429, retry_after=1.0, match=lambda m, p: p.startswith("/api/models"))
    started = time.monotonic()
    assert cache.fetch("hf://org/m/w.bin").read_bytes() == b"w" * 3000
    assert time.monotonic() - started >= 1.0


def test_missing_huggingface_hub_names_the_install_command(
    cache: Cache, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the extra were missing
    with pytest.raises(SourceError) as caught:
        cache.fetch("hf://org/m/w.bin", model="m")
    assert "pip install 'modelcache[hf]'" in str(caught.value)
    assert hub.requests == []


# -- mirrors: no revision means main, listings fill in what repo info leaves out -----------------


@pytest.fixture
def sparse_hub(monkeypatch: pytest.MonkeyPatch, store_env: None) -> Iterator[HubStandIn]:
    """A mirror whose repo info lists file names only (as olah's): sizes and digests come from
    the tree and paths-info routes."""
    with HubStandIn(info_metadata=False) as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
        yield stand_in


def test_no_revision_asks_for_main_not_the_bare_repo_route(cache: Cache, hub: HubStandIn) -> None:
    hub.push("org/m", {"w.bin": b"w" * 3000})
    cache.fetch("hf://org/m/w.bin")
    assert hub.count(lambda m, p: p == "/api/models/org/m/revision/main") == 1
    assert hub.count(lambda m, p: p == "/api/models/org/m") == 0


def test_repo_info_without_digests_is_completed_by_the_listing_routes(
    cache: Cache, sparse_hub: HubStandIn
) -> None:
    data = make_payload(MiB, seed=8)
    sparse_hub.push("org/m", WHISPER | {"model.bin": data})

    one = cache.fetch("hf://org/m/model.bin")
    repo = cache.fetch("hf://org/m")

    assert one.read_bytes() == data
    assert (repo / "model.bin").read_bytes() == data
    assert "unverified" not in meta_of(one)
    assert "unverified" not in meta_of(repo)
    assert sparse_hub.count(lambda m, p: m == "POST" and "/paths-info/" in p) == 1
    assert sparse_hub.count(lambda m, p: "/tree/" in p) == 1


@pytest.mark.parametrize("url", ["hf://org/m/model.bin", "hf://org/m", "hf://org/m/config.json"])
def test_the_listed_digests_are_checked(cache: Cache, sparse_hub: HubStandIn, url: str) -> None:
    data = make_payload(MiB, seed=9)
    sparse_hub.push("org/m", WHISPER | {"model.bin": data})
    sparse_hub.tamper(sha(data), make_payload(MiB, seed=10))  # the LFS file
    sparse_hub.tamper_small("org/m", "config.json", b'{"a": 2}')  # a small file

    with pytest.raises(IntegrityError, match="mismatch"):
        cache.fetch(url)
    assert cache.entries() == []


def test_files_no_route_gives_a_digest_for_are_recorded_as_unverified(
    cache: Cache,
    monkeypatch: pytest.MonkeyPatch,
    store_env: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with HubStandIn(info_metadata=False, listing_routes=False) as bare:
        monkeypatch.setenv("HF_ENDPOINT", bare.url)
        bare.push("org/m", WHISPER)
        with caplog.at_level(logging.DEBUG, logger="modelcache"):
            one = cache.fetch("hf://org/m/model.bin")
            repo = cache.fetch("hf://org/m?include=*.json")

    assert one.read_bytes() == WHISPER["model.bin"]
    assert meta_of(one)["unverified"] == ["model.bin"]
    assert meta_of(repo)["unverified"] == ["config.json", "tokenizer.json"]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("no digest" in m and "model.bin" in m and "unverified" in m for m in said)
