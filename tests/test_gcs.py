"""gs:// and gcs:// sources: the real gcsfs client against gcp-storage-emulator on 127.0.0.1."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import MiB, make_payload, sha
from servers.proxy import FaultProxy
from servers.stores import GCSBucket

from modelcache import Cache, IntegrityError, SourceError

pytest_plugins = ["servers.fixtures"]


def media(key: str) -> object:
    """A proxy match for downloads of one object's bytes."""
    return lambda method, path: "alt=media" in path and key.replace("/", "%2F") in path


def test_object_is_fetched_then_served_without_network(
    cache: Cache, gcs_bucket: GCSBucket, gcs_proxy: FaultProxy
) -> None:
    data = make_payload(3 * MiB + 1)
    url = gcs_bucket.put("models/sam2.pt", data)
    options = {"gs": gcs_bucket.options(gcs_proxy.url)}

    first = cache.fetch_details(url, storage_options=options)
    assert first.path.read_bytes() == data
    assert first.sha256 == sha(data)

    gcs_proxy.clear()
    assert cache.fetch_details(url, storage_options=options).cache_hit
    assert gcs_proxy.requests == []


def test_gcs_scheme_and_emulator_host_variable(
    cache: Cache, gcs_bucket: GCSBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_payload(MiB)
    gcs_bucket.put("env.bin", data)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_bucket.endpoint)
    url = f"gcs://{gcs_bucket.name}/env.bin"
    assert (
        cache.fetch(url, sha(data), storage_options={"gcs": {"token": "anon"}}).read_bytes() == data
    )


def test_prefix_is_one_entry(cache: Cache, gcs_bucket: GCSBucket) -> None:
    files = {"groundingdino.pth": make_payload(MiB, seed=1), "sam2/config.yaml": b"a: 1\n"}
    for name, data in files.items():
        gcs_bucket.put(f"weights/{name}", data)
    got = cache.fetch(gcs_bucket.url("weights/"), storage_options=gcs_bucket.options())
    assert {
        p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()
    } == files


def test_503_and_cut_connections_are_retried(
    cache: Cache, gcs_bucket: GCSBucket, gcs_proxy: FaultProxy
) -> None:
    data = make_payload(4 * MiB, seed=2)
    url = gcs_bucket.put("flaky.bin", data)
    gcs_proxy.fail(times=2, status=503, match=media("flaky.bin"))
    gcs_proxy.cut(after=MiB // 2, times=1, match=media("flaky.bin"))

    got = cache.fetch(url, sha(data), storage_options=gcs_bucket.options(gcs_proxy.url))

    assert got.read_bytes() == data
    assert gcs_proxy.count(media("flaky.bin")) >= 4


def test_missing_object_is_a_source_error(cache: Cache, gcs_bucket: GCSBucket) -> None:
    url = gcs_bucket.url("missing.pt")
    started = time.monotonic()
    with pytest.raises(SourceError) as caught:
        cache.fetch(url, storage_options=gcs_bucket.options(), model="sam2")
    assert time.monotonic() - started < 10
    assert caught.value.status == 404
    assert url in str(caught.value)


def test_sha256_in_object_metadata_is_checked(cache: Cache, gcs_bucket: GCSBucket) -> None:
    url = gcs_bucket.put("lying.bin", make_payload(MiB), metadata={"sha256": "f" * 64})
    with pytest.raises(IntegrityError, match="the store says ffff"):
        cache.fetch(url, storage_options=gcs_bucket.options())
    assert cache.entries() == []


def test_missing_gcsfs_names_the_install_command(
    cache: Cache, gcs_bucket: GCSBucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(SourceError) as caught:
        cache.fetch(gcs_bucket.url("x.bin"), storage_options=gcs_bucket.options())
    assert "pip install 'modelcache[gcs]'" in str(caught.value)
