"""mirror(): copy a model from its origin to your own bucket or volume, keeping its sha256."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from conftest import MiB, make_payload, sha
from servers.hub import HubStandIn
from servers.proxy import FaultProxy
from servers.stores import GCSBucket, S3Bucket

from modelcache import Cache, IntegrityError, SourceError
from modelcache._hashing import manifest_digest
from modelcache.mirror import mirror
from modelcache.testing import ModelServer

pytest_plugins = ["servers.fixtures"]

WHISPER = {
    "config.json": b'{"n_mels": 80}',
    "model.bin": make_payload(MiB + 7, seed=21),
    "vocabulary.txt": b"hello\n",
}


def test_cdn_file_to_a_bucket_then_served_from_it(
    cache: Cache, model_server: ModelServer, s3_bucket: S3Bucket
) -> None:
    data = make_payload(3 * MiB, seed=1)
    origin = model_server.add("sharp_2572gikvuh.pt", data)

    done = mirror(origin, s3_bucket.url("models/"), dest_options=s3_bucket.options(), cache=cache)

    assert done.dest == s3_bucket.url("models/sharp_2572gikvuh.pt")
    assert done.sha256 == sha(data)
    assert (done.size, done.files, done.copied) == (len(data), 1, 1)
    assert s3_bucket.get("models/sharp_2572gikvuh.pt") == data
    assert s3_bucket.head("models/sharp_2572gikvuh.pt")["Metadata"] == {"sha256": sha(data)}

    # a handle pinned to the sha256 uses the bucket and the origin interchangeably
    asked = model_server.count("sharp_2572gikvuh.pt")
    elsewhere = Cache(cache.path.parent / "other", read_only_paths=[], offline=False)
    got = elsewhere.fetch(
        [done.dest, origin], done.sha256, storage_options={"s3": s3_bucket.options()}
    )
    assert got.read_bytes() == data
    assert model_server.count("sharp_2572gikvuh.pt") == asked  # the bucket served it


def test_running_it_again_copies_nothing(
    cache: Cache, model_server: ModelServer, s3_bucket: S3Bucket
) -> None:
    origin = model_server.add("w.pt", make_payload(MiB))
    first = mirror(origin, s3_bucket.url("w.pt"), dest_options=s3_bucket.options(), cache=cache)
    again = mirror(origin, s3_bucket.url("w.pt"), dest_options=s3_bucket.options(), cache=cache)
    assert (first.copied, again.copied) == (1, 0)
    assert again.dest == s3_bucket.url("w.pt")


def test_hub_repo_to_a_bucket_prefix_keeps_the_directory_digest(
    cache: Cache, hub: HubStandIn, s3_bucket: S3Bucket
) -> None:
    hub.push("Systran/faster-whisper-tiny", {**WHISPER, "README.md": b"# readme"})
    source = "hf://Systran/faster-whisper-tiny?include=config.json,model.bin,vocabulary.*"

    done = mirror(source, s3_bucket.url("mirrors/"), dest_options=s3_bucket.options(), cache=cache)

    digest = manifest_digest([(n, sha(d)) for n, d in WHISPER.items()])
    assert done.sha256 == digest
    assert done.dest == s3_bucket.url("mirrors/faster-whisper-tiny")
    for name, data in WHISPER.items():
        assert s3_bucket.get(f"mirrors/faster-whisper-tiny/{name}") == data
    fresh = Cache(cache.path.parent / "fresh", read_only_paths=[], offline=False)
    again = fresh.fetch_details(
        s3_bucket.url("mirrors/faster-whisper-tiny/"), digest, storage_options=s3_bucket.options()
    )
    assert again.sha256 == digest


def test_to_a_local_volume_with_a_sha256sum_file(
    cache: Cache, model_server: ModelServer, tmp_path: Path
) -> None:
    data = make_payload(MiB, seed=4)
    origin = model_server.add("sam2_hiera_large.pt", data)
    volume = tmp_path / "volume" / "weights"
    volume.mkdir(parents=True)

    done = mirror(origin, volume, cache=cache)

    copy = volume / "sam2_hiera_large.pt"
    assert done.dest == copy.as_posix()
    assert copy.read_bytes() == data
    check = subprocess.run(
        ["sha256sum", "-c", "sam2_hiera_large.pt.sha256"],
        cwd=volume,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert [p.name for p in volume.iterdir() if p.name.startswith(".")] == []


def test_to_gcs(cache: Cache, model_server: ModelServer, gcs_bucket: GCSBucket) -> None:
    data = make_payload(2 * MiB, seed=5)
    origin = model_server.add("groundingdino_swint_ogc.pth", data)
    done = mirror(origin, gcs_bucket.url("w/"), dest_options=gcs_bucket.options(), cache=cache)
    assert gcs_bucket.get("w/groundingdino_swint_ogc.pth") == data
    info = gcs_bucket.fs.info(f"{gcs_bucket.name}/w/groundingdino_swint_ogc.pth")
    assert info["metadata"] == {"sha256": done.sha256}


def test_wrong_sha256_copies_nothing(
    cache: Cache, model_server: ModelServer, s3_bucket: S3Bucket
) -> None:
    origin = model_server.add("w.pt", make_payload(MiB))
    with pytest.raises(IntegrityError):
        mirror(
            origin,
            s3_bucket.url("w.pt"),
            sha256=hashlib.sha256(b"other").hexdigest(),
            dest_options=s3_bucket.options(),
            cache=cache,
        )
    assert s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name).get("KeyCount") == 0


def test_unwritable_destination_is_a_source_error_naming_it(
    cache: Cache, model_server: ModelServer, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    origin = model_server.add("w.pt", make_payload(MiB))
    s3_proxy.fail(times=1000, status=403, match=lambda method, path: method == "PUT")
    dest = s3_bucket.url("w.pt")
    with pytest.raises(SourceError) as caught:
        mirror(origin, dest, dest_options=s3_bucket.options(s3_proxy.url), cache=cache)
    assert dest in str(caught.value)
    assert caught.value.status == 403
