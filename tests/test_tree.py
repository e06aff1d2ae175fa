"""Directory entries and mirror chains across schemes (S3, the Hub, HTTPS) on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST, MiB, code_blocks, make_payload, sha, venv_env
from servers.hub import HubStandIn
from servers.proxy import FaultProxy
from servers.stores import S3_KEY, S3_SECRET, GCSBucket, S3Bucket, ServerProcess

from modelcache import Cache, IntegrityError, ModelHandle, SourceError
from modelcache._hashing import manifest_digest
from modelcache._plan import Selection
from modelcache.testing import ModelServer

pytest_plugins = ["servers.fixtures"]

REPO = {
    "config.json": b'{"d_model": 384}',
    "model.safetensors": make_payload(2 * MiB, seed=11),
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}


def test_mirror_chain_across_schemes_first_that_works_wins(
    cache: Cache, s3_bucket: S3Bucket, hub: HubStandIn, model_server: ModelServer
) -> None:
    data = make_payload(MiB, seed=1)
    hub.push("apple/sharp", {"sharp.pt": data})
    origin = model_server.add("sharp.pt", data)
    chain = [s3_bucket.url("mirror/sharp.pt"), "hf://apple/sharp/sharp.pt", origin]
    options = {"s3": s3_bucket.options(), "hf": {"endpoint": hub.url}, "https": {}}

    got = cache.fetch_details(chain, sha(data), options)

    assert got.path.read_bytes() == data
    assert got.source == "hf://apple/sharp/sharp.pt"
    assert model_server.count("sharp.pt") == (0, 0)


def test_mirror_chain_that_all_fails_lists_every_attempt_redacted(
    cache: Cache, s3_bucket: S3Bucket, hub: HubStandIn, model_server: ModelServer
) -> None:
    hub.push("apple/sharp", {"other.pt": b"x"})
    origin = model_server.url.replace("http://", "http://user:hunter2@") + "/sharp.pt"
    chain = [s3_bucket.url("mirror/sharp.pt"), "hf://apple/sharp/sharp.pt", origin]
    options = {"s3": s3_bucket.options(), "hf": {"endpoint": hub.url, "token": "hf_secretTok"}}

    with pytest.raises(SourceError) as caught:
        cache.fetch(chain, storage_options=options, model="sharp")

    error = caught.value
    assert [source for source, _ in error.attempts] == [
        s3_bucket.url("mirror/sharp.pt"),
        "hf://apple/sharp/sharp.pt",
        origin.replace("user:hunter2", "***"),
    ]
    reasons = [reason for _, reason in error.attempts]
    assert "not found" in reasons[0]
    assert "'sharp.pt' not found" in reasons[1]
    assert "404" in reasons[2]
    message = str(error)
    for secret in ("hunter2", "hf_secretTok", S3_SECRET):
        assert secret not in message
    assert cache.entries() == []


def test_directory_digest_is_the_sha256sum_manifest(cache: Cache, s3_bucket: S3Bucket) -> None:
    for name, data in REPO.items():
        s3_bucket.put(f"m/{name}", data)
    got = cache.fetch_details(s3_bucket.url("m/"), storage_options=s3_bucket.options())

    # the command docs/stores.md gives for computing a directory's sha256 by hand
    (command,) = [b for b in code_blocks("stores.md", "bash") if "sha256sum" in b]
    by_hand = subprocess.run(
        ["bash", "-c", command], cwd=got.path, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert got.sha256 == by_hand == manifest_digest([(n, sha(d)) for n, d in REPO.items()])


def test_directory_pinned_by_its_sha256(cache: Cache, s3_bucket: S3Bucket) -> None:
    for name, data in REPO.items():
        s3_bucket.put(f"m/{name}", data)
    digest = manifest_digest([(n, sha(d)) for n, d in REPO.items()])
    url = s3_bucket.url("m/")

    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.fetch(url, "0" * 64, storage_options=s3_bucket.options())
    assert cache.entries() == []

    got = cache.fetch_details(url, digest, storage_options=s3_bucket.options())
    assert got.sha256 == digest
    assert [e.sha256 for e in cache.entries()] == [digest]


def test_verify_finds_a_flipped_byte_in_one_file_of_a_directory(
    cache: Cache, s3_bucket: S3Bucket
) -> None:
    for name, data in REPO.items():
        s3_bucket.put(f"m/{name}", data)
    got = cache.fetch(s3_bucket.url("m/"), storage_options=s3_bucket.options())
    assert cache.verify() == []

    target = got / "model.safetensors"
    blob = bytearray(target.read_bytes())
    blob[12345] ^= 0xFF
    target.write_bytes(bytes(blob))

    problems = cache.verify()
    assert len(problems) == 1
    assert "model.safetensors" in problems[0]


def test_files_of_a_directory_are_fetched_concurrently(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    for i in range(4):
        s3_bucket.put(f"slow/part-{i}.bin", make_payload(1000, seed=i))
    # each file's first GET answers 503 after a second: one after the other would take 4 s
    s3_proxy.fail(
        times=4, status=503, delay=1.0, match=lambda m, p: m == "GET" and "/slow/part-" in p
    )

    started = time.monotonic()
    got = cache.fetch(s3_bucket.url("slow/"), storage_options=s3_bucket.options(s3_proxy.url))
    elapsed = time.monotonic() - started

    assert len(list(got.iterdir())) == 4
    assert elapsed < 3.0


def test_cancelling_a_directory_fetch_stops_every_file(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    for i in range(3):
        s3_bucket.put(f"stuck/part-{i}.bin", make_payload(1000, seed=i))
    s3_proxy.fail(times=1000, status=503, delay=0.3, match=lambda m, p: "/stuck/part-" in p)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()

    started = time.monotonic()
    with pytest.raises(SourceError, match="cancelled"):
        cache.fetch_details(
            s3_bucket.url("stuck/"),
            storage_options=s3_bucket.options(s3_proxy.url),
            cancel=cancel,
        )
    assert time.monotonic() - started < 3.0
    assert cache.entries() == []


def test_concurrent_fetches_of_one_directory_download_it_once(
    cache: Cache, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    for name, data in REPO.items():
        s3_bucket.put(f"m/{name}", data)
    url = s3_bucket.url("m/")
    options = s3_bucket.options(s3_proxy.url)
    results: list[Path] = []

    def fetch() -> None:
        results.append(
            Cache(cache.path, read_only_paths=[], offline=False, transfer=cache.transfer).fetch(
                url, storage_options=options
            )
        )

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(set(results)) == 1
    assert len(results) == 4
    weights = "/m/model.safetensors"
    assert s3_proxy.count(lambda m, p: m == "GET" and p.split("?")[0].endswith(weights)) == 1


def test_a_handle_loads_a_directory_entry(cache: Cache, hub: HubStandIn) -> None:
    hub.push("Systran/faster-whisper-tiny", REPO)
    handle = ModelHandle(
        "whisper",
        source="hf://Systran/faster-whisper-tiny?include=config.json,tokenizer/",
        loader=lambda path: json.loads((path / "config.json").read_text()),
        cache=cache,
    )
    assert handle.get() == {"d_model": 384}
    assert handle.status()["cache_hit"] is False
    assert sorted(p.name for p in handle.fetch().rglob("*")) == [
        "config.json",
        "tokenizer",
        "vocab.txt",
    ]


def test_selection_patterns_follow_the_hubs_rules() -> None:
    selection = Selection(include=("*.json", "tokenizer/", "vocabulary.*"), exclude=("*.onnx",))
    assert selection.wants("config.json")
    assert selection.wants("sub/config.json")  # "*" also matches "/"
    assert selection.wants("tokenizer/merges.txt")
    assert selection.wants("vocabulary.txt")
    assert not selection.wants("model.bin")
    assert not Selection(exclude=("*.onnx",)).wants("model.onnx")
    assert Selection(exclude=("*.onnx",)).wants("model.bin")


# -- docs/stores.md runs as written ---------------------------------------------------------------


def test_stores_page_runs_as_documented(
    s3_bucket: S3Bucket,
    gcs_bucket: GCSBucket,
    hub: HubStandIn,
    model_server: ModelServer,
    moto_server: ServerProcess,
    gcs_server: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sharp = make_payload(MiB, seed=31)
    s3_bucket.put("sharp/sharp_2572gikvuh.pt", sharp)
    for name in ("diffusion_model.safetensors", "config.json"):
        s3_bucket.put(f"wan/{name}", make_payload(300_000, seed=len(name)))
    sam2 = make_payload(500_000, seed=32)
    gcs_bucket.put("sam2/sam2_hiera_large.pt", sam2)
    whisper = {
        "config.json": b"{}",
        "model.bin": make_payload(400_000, seed=33),
        "tokenizer.json": b'{"model": {}}',
        "vocabulary.txt": b"a\n",
        "README.md": b"# tiny\n",
    }
    commit = hub.push("Systran/faster-whisper-tiny", whisper)
    hub.push("apple/Sharp", {"sharp_2572gikvuh.pt": sharp})
    hub.push("Wan-AI/Wan2.1-I2V-14B-720P", {"config.json": b"{}", "model.bin": b"w" * 5000})
    cdn = model_server.add("models/sharp/sharp_2572gikvuh.pt", sharp)
    env = {
        "AWS_ENDPOINT_URL": moto_server.endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "STORAGE_EMULATOR_HOST": gcs_server.endpoint,
        "MODELCACHE_HOME": str(tmp_path / "home"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    image_cache = tmp_path / "opt" / "modelcache"  # what the Docker build baked in
    Cache(image_cache).fetch(gcs_bucket.url("sam2/sam2_hiera_large.pt"))
    swaps = {
        "s3://my-models/": f"s3://{s3_bucket.name}/",
        "gs://my-models/": f"gs://{gcs_bucket.name}/",
        "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt": cdn,
        "https://minio.internal:9000": moto_server.endpoint,
        "MODELS_READER": S3_KEY,
        "s3cr3t-v4lue": S3_SECRET,
        "d90ca5fe260221311c53c58e660288d3deb8d356": commit,
        "/workspace": str(tmp_path / "workspace"),
        "/opt/modelcache": str(image_cache),
        '"/cache"': f'"{tmp_path / "cache"}"',
    }

    def swap(text: str) -> str:
        for old, new in swaps.items():
            text = text.replace(old, new)
        return text

    namespace: dict[str, Any] = {"__name__": "docs_stores"}
    for n, block in enumerate(code_blocks("stores.md", "python")):
        exec(compile(swap(block), f"docs/stores.md[python {n}]", "exec"), namespace)

    wan_shard = make_payload(300_000, seed=len("diffusion_model.safetensors"))
    assert namespace["path"].read_bytes() == sharp
    assert namespace["shard"].read_bytes() == wan_shard
    assert namespace["checkpoint"].read_bytes() == sam2
    assert namespace["weights"].read_bytes() == whisper["model.bin"]
    assert sorted(p.name for p in namespace["whisper"].iterdir()) == [
        "config.json",
        "model.bin",
        "tokenizer.json",
        "vocabulary.txt",
    ]
    assert sorted(p.name for p in namespace["wan"].iterdir()) == [
        "config.json",
        "diffusion_model.safetensors",
    ]
    assert namespace["done"].sha256 == sha(sharp)
    assert s3_bucket.head("sharp/sharp_2572gikvuh.pt")["Metadata"] == {"sha256": sha(sharp)}
    assert namespace["state_dict_path"].read_bytes() == sharp
    assert image_cache in namespace["sam2"].parents  # used in place from the image's cache

    shell_env = venv_env({**os.environ, **env, "HF_ENDPOINT": hub.url, "MODELCACHE_PROGRESS": "0"})
    for block in code_blocks("stores.md", "bash"):
        if "sha256sum" in block:
            continue  # run against a directory entry by the test above
        done = subprocess.run(
            ["bash", "-c", swap(block)],
            env=shell_env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, f"{block}\n{done.stdout}\n{done.stderr}"
    assert s3_bucket.get("whisper/faster-whisper-tiny/model.bin") == whisper["model.bin"]
    volume = Cache(tmp_path / "workspace" / "modelcache", offline=True)
    assert volume.fetch("hf://Wan-AI/Wan2.1-I2V-14B-720P").name == "Wan2.1-I2V-14B-720P"

    # the error shown on the page has the shape of the real one
    (shown,) = code_blocks("stores.md", "text")
    s3_bucket.delete("sharp/sharp_2572gikvuh.pt")
    model_server.fail_next("models/sharp/sharp_2572gikvuh.pt", times=1000, status=503)
    hub.fail(times=1000, status=404, match=lambda method, path: "/apple/Sharp" in path)
    failing = ModelHandle(
        "sharp",
        source=[
            s3_bucket.url("sharp/sharp_2572gikvuh.pt"),
            "hf://apple/Sharp/sharp_2572gikvuh.pt",
            cdn,
        ],
        cache=Cache(tmp_path / "empty", transfer=FAST),
    )
    with pytest.raises(SourceError) as caught:
        failing.fetch()
    real, page = str(caught.value).splitlines(), shown.splitlines()
    assert len(real) == len(page)
    assert real[:2] == [swap(page[0]), page[1]]
    for ours, documented in zip(real[2:], page[2:], strict=True):
        assert ours.split(": ")[1].split()[0] == swap(documented).split(": ")[1].split()[0]
