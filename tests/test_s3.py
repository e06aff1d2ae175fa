"""s3:// sources: the real s3fs/botocore client against moto's S3 server on 127.0.0.1.

Faults are real: a proxy in front of the server answers 503 or cuts connections mid-body.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FAST, MiB, make_payload, sha
from servers.proxy import FaultProxy
from servers.stores import S3_SECRET, S3Bucket

from modelcache import Cache, IntegrityError, SourceError
from modelcache._hashing import manifest_digest

pytest_plugins = ["servers.fixtures"]
SIGNED = re.compile(r"[?&](?:X-Amz-)?Signature=([^&\s]+)")  # a query-signed URL (v2 or v4)


def gets(key: str) -> object:
    """A proxy match for GETs of one object (not HEADs or listings)."""
    return lambda method, path: method == "GET" and path.split("?")[0].endswith("/" + key)


def test_object_is_fetched_verified_and_then_served_without_network(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    data = make_payload(5 * MiB + 3)
    url = s3_bucket.put("models/sharp.pt", data)
    options = s3_bucket.options(s3_proxy.url)

    first = cache.fetch_details(url, storage_options=options)
    assert not first.cache_hit
    assert first.path.name == "sharp.pt"
    assert first.path.read_bytes() == data
    assert first.sha256 == sha(data)

    s3_proxy.clear()
    again = Cache(cache.path, read_only_paths=[], offline=False).fetch_details(
        url, storage_options=options
    )
    assert again.cache_hit
    assert again.path == first.path
    assert s3_proxy.requests == []


def test_endpoint_and_credentials_from_the_usual_environment_variables(
    cache: Cache, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_payload(MiB)
    url = s3_bucket.put("env.bin", data)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.options()["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")

    assert cache.fetch(url, sha(data)).read_bytes() == data


def test_prefix_is_one_entry_with_every_file_verified(cache: Cache, s3_bucket: S3Bucket) -> None:
    files = {
        "config.json": b'{"dim": 4}',
        "model-00001-of-00002.safetensors": make_payload(3 * MiB, seed=1),
        "model-00002-of-00002.safetensors": make_payload(2 * MiB, seed=2),
        "tokenizer/vocab.txt": b"a\nb\n",
    }
    for name, data in files.items():
        s3_bucket.put(f"models/wan/{name}", data)
    s3_bucket.put("models/other.bin", b"not part of wan")

    got = cache.fetch_details(s3_bucket.url("models/wan/"), storage_options=s3_bucket.options())

    assert got.path.is_dir()
    assert got.path.name == "wan"
    found = {
        p.relative_to(got.path).as_posix(): p.read_bytes()
        for p in got.path.rglob("*")
        if p.is_file()
    }
    assert found == files
    meta = json.loads((got.path.parent / "meta.json").read_text())
    assert meta["kind"] == "directory"
    assert {r["path"]: r["sha256"] for r in meta["files"]} == {
        f"wan/{name}": sha(data) for name, data in files.items()
    }
    assert got.sha256 == manifest_digest([(n, sha(d)) for n, d in files.items()])
    assert got.size == sum(len(d) for d in files.values())
    assert cache.fetch_details(
        s3_bucket.url("models/wan/"), storage_options=s3_bucket.options()
    ).cache_hit


def test_prefix_without_trailing_slash_is_still_a_directory(
    cache: Cache, s3_bucket: S3Bucket
) -> None:
    s3_bucket.put("models/tiny/model.bin", b"weights")
    got = cache.fetch(s3_bucket.url("models/tiny"), storage_options=s3_bucket.options())
    assert (got / "model.bin").read_bytes() == b"weights"


def test_include_and_exclude_choose_files_of_a_prefix(cache: Cache, s3_bucket: S3Bucket) -> None:
    for name in (
        "config.json",
        "model.bin",
        "model.onnx",
        "tokenizer.json",
        "vocabulary.txt",
        "README.md",
    ):
        s3_bucket.put(f"whisper/{name}", name.encode())
    url = s3_bucket.url("whisper/") + "?include=*.json,model.bin,vocabulary.*&exclude=config.*"

    got = cache.fetch(url, storage_options=s3_bucket.options())

    assert sorted(p.name for p in got.iterdir()) == [
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]


def test_transient_503s_are_retried(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    data = make_payload(2 * MiB)
    url = s3_bucket.put("flaky.bin", data)
    s3_proxy.fail(times=2, status=503, match=gets("flaky.bin"))

    got = cache.fetch(url, storage_options=s3_bucket.options(s3_proxy.url))

    assert got.read_bytes() == data
    assert s3_proxy.count(gets("flaky.bin")) == 3


def test_a_store_that_keeps_failing_ends_in_source_error_and_caches_nothing(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    url = s3_bucket.put("down.bin", make_payload(MiB))
    s3_proxy.fail(times=1000, status=503, match=gets("down.bin"))

    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        cache.fetch(url, storage_options=s3_bucket.options(s3_proxy.url), model="sharp")
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "sharp" in message
    assert url in message
    assert "503" in message
    assert S3_SECRET not in message
    assert cache.entries() == []


def test_cut_connection_resumes_where_the_bytes_stopped(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    data = make_payload(6 * MiB + 5)
    url = s3_bucket.put("cut.bin", data)
    s3_proxy.cut(after=MiB + 100, times=2, match=gets("cut.bin"))

    got = cache.fetch_details(url, sha(data), storage_options=s3_bucket.options(s3_proxy.url))

    assert got.path.read_bytes() == data
    assert s3_proxy.count(gets("cut.bin")) == 3


def test_missing_key_is_a_clear_source_error_without_retries(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    url = s3_bucket.url("nope/missing.pt")
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        cache.fetch(url, storage_options=s3_bucket.options(s3_proxy.url), model="m")
    assert time.monotonic() - started < 5
    assert caught.value.status == 404
    assert "not found" in str(caught.value)
    assert url in str(caught.value)


def test_empty_prefix_is_a_source_error(cache: Cache, s3_bucket: S3Bucket) -> None:
    with pytest.raises(SourceError, match="no files"):
        cache.fetch(s3_bucket.url("empty/"), storage_options=s3_bucket.options())


def test_sha256_kept_beside_the_object_is_checked(cache: Cache, s3_bucket: S3Bucket) -> None:
    data = make_payload(MiB)
    url = s3_bucket.put("lying.bin", data, metadata={"sha256": "0" * 64})

    with pytest.raises(IntegrityError, match="the store says 0000"):
        cache.fetch(url, storage_options=s3_bucket.options())
    assert cache.entries() == []

    honest = s3_bucket.put("honest.bin", data, metadata={"sha256": sha(data)})
    assert cache.fetch(honest, storage_options=s3_bucket.options()).read_bytes() == data


def test_object_replaced_between_attempts_is_fetched_whole_again(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    old, new = make_payload(3 * MiB, seed=1), make_payload(3 * MiB, seed=2)
    url = s3_bucket.put("moving.bin", old)
    options = s3_bucket.options(s3_proxy.url)
    s3_proxy.cut(after=MiB, times=1, match=gets("moving.bin"))
    s3_proxy.fail(times=1000, status=500, match=gets("moving.bin"))
    with pytest.raises(SourceError):
        cache.fetch(url, storage_options=options)  # leaves a part file with the old bytes

    s3_bucket.put("moving.bin", new)
    s3_proxy.clear()
    assert cache.fetch(url, storage_options=options).read_bytes() == new


def test_objects_are_read_through_urls_that_s3fs_signs(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    data = make_payload(2 * MiB)
    url = s3_bucket.put("signed.bin", data)
    got = cache.fetch(url, sha(data), storage_options=s3_bucket.options(s3_proxy.url))
    assert got.read_bytes() == data
    object_gets = [path for method, path in s3_proxy.requests if gets("signed.bin")(method, path)]
    assert object_gets
    assert all(SIGNED.search(path) for path in object_gets)


#: one connection measured below this is split into parallel ranges (lower than the default,
#: so that the Python proxy in front of moto is surely faster when it does not cap)
PROBED = replace(FAST, split_below=8 * MiB)


@pytest.mark.parametrize("cap", [2 * MiB, None], ids=["capped", "uncapped"])
def test_the_first_get_decides_between_one_stream_and_parallel_ranges(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy, cap: int | None
) -> None:
    data = make_payload(8 * MiB + 7)
    url = s3_bucket.put("probed.bin", data)
    s3_proxy.throttle(cap)  # per connection, like a busy store
    # 256 KiB chunks: the first GET is judged and, when slow, cut after 8 of them
    options = {**s3_bucket.options(s3_proxy.url), "chunk_size": 256 * 1024}
    probed = Cache(cache.path, read_only_paths=[], offline=False, transfer=PROBED)

    got = probed.fetch(url, sha(data), storage_options=options)

    assert got.read_bytes() == data
    object_gets = gets("probed.bin")
    ranges = [
        headers.get("Range")
        for (method, path), headers in zip(s3_proxy.requests, s3_proxy.headers, strict=True)
        if object_gets(method, path)
    ]
    assert ranges[0] is None  # one GET of the object: its first bytes measure the store
    if cap is None:  # fast enough: that GET goes on to the end
        assert ranges == [None]
        assert s3_proxy.bytes_sent == len(data)
    else:  # capped: cut after 8 chunks (2 MiB), the rest as ranged GETs at once
        assert len(ranges) > 2
        assert all(r is not None and r.startswith("bytes=") for r in ranges[1:])
        assert f"bytes={2 * MiB}-{9 * MiB // 4 - 1}" in ranges  # the chunk after the cut
        assert s3_proxy.most_at_once(object_gets) > 2
        # a GET costs more than what a cut one had in flight: little on a capped connection
        assert len(data) <= s3_proxy.bytes_sent < len(data) + 512 * 1024


def test_requester_pays_goes_through_the_botocore_client(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    # a signed URL cannot carry the x-amz-request-payer header: botocore sends it instead
    data = make_payload(2 * MiB + 1)
    url = s3_bucket.put("payer.bin", data)
    options = {**s3_bucket.options(s3_proxy.url), "requester_pays": True}
    got = cache.fetch(url, sha(data), storage_options=options)
    assert got.read_bytes() == data
    object_gets = [path for method, path in s3_proxy.requests if gets("payer.bin")(method, path)]
    assert object_gets
    assert not any(SIGNED.search(path) for path in object_gets)


def test_missing_s3fs_names_the_install_command(
    cache: Cache, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if the extra were not installed
    with pytest.raises(SourceError) as caught:
        cache.fetch(s3_bucket.url("x.bin"), storage_options=s3_bucket.options(), model="m")
    assert "pip install 'modelcache[s3]'" in str(caught.value)


def test_credentials_never_reach_metadata_or_errors(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    url = s3_bucket.put("secret.bin", b"data")
    got = cache.fetch_details(url, storage_options=s3_bucket.options(s3_proxy.url))
    assert S3_SECRET not in (got.path.parent / "meta.json").read_text()

    s3_proxy.fail(times=1000, status=403, match=gets("gone.bin"))
    with pytest.raises(SourceError) as caught:
        cache.fetch(
            s3_bucket.put("gone.bin", b"x"), storage_options=s3_bucket.options(s3_proxy.url)
        )
    assert caught.value.status == 403
    assert S3_SECRET not in str(caught.value)
    assert S3_SECRET not in repr(caught.value.__dict__)
    signatures = SIGNED.findall(" ".join(path for _, path in s3_proxy.requests))
    assert signatures  # the object was asked for with a signed URL...
    for signature in signatures:  # ...whose signature shows nowhere
        assert signature not in str(caught.value)
        assert signature not in repr(caught.value.__dict__)


def test_interrupted_prefix_resumes_file_by_file(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    files = {f"shard-{i}.bin": make_payload(MiB + i, seed=i) for i in range(5)}
    for name, data in files.items():
        s3_bucket.put(f"big/{name}", data)
    options = s3_bucket.options(s3_proxy.url)
    # shard-3 fails slowly, so the other shards finish before the fetch gives up
    s3_proxy.fail(times=1000, status=503, match=gets("shard-3.bin"), delay=0.4)

    with pytest.raises(SourceError, match=re.escape("shard-3.bin")):
        cache.fetch(s3_bucket.url("big/"), storage_options=options)
    assert cache.entries() == []  # nothing half there
    assert not any(p.is_dir() for p in Path(cache.path).iterdir() if not p.name.startswith("."))

    s3_proxy.clear()
    got = cache.fetch(s3_bucket.url("big/"), storage_options=options)
    assert {p.name: p.read_bytes() for p in got.iterdir()} == files
    done_before = [n for n in files if n != "shard-3.bin"]
    assert all(s3_proxy.count(gets(n)) == 0 for n in done_before)
    assert s3_proxy.count(gets("shard-3.bin")) >= 1
