"""``oci://`` sources through the cache, handles, ``mirror`` and the CLI, against Debian's real
docker-registry (plain http on 127.0.0.1, or token auth), with real faults (a proxy that cuts or
refuses, bytes flipped in the registry's store, the registry stopped)."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    EXAMPLE_HOST,
    FAST,
    MiB,
    ProxyOf,
    code_blocks,
    make_payload,
    run_python_blocks,
    sha,
    wait_for,
)
from servers.proxy import FaultProxy
from servers.registry import PASSWORD, USER, Registry, start_registry

from modelcache import (
    Cache,
    IntegrityError,
    ModelHandle,
    NotCachedError,
    SourceError,
)
from modelcache._oci import ARTIFACT_TYPE, Pushed, push_path
from modelcache.mirror import mirror


def _address(where: Registry | FaultProxy) -> str:
    return where.address if isinstance(where, Registry) else where.url[len("http://") :]


def _url(where: Registry | FaultProxy, repository: str, tag: str = "v1") -> str:
    return f"oci://{_address(where)}/{repository}:{tag}"


def _repository() -> str:
    return f"org/m{uuid.uuid4().hex[:10]}"


def _files(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def _push(path: Path, url: str, **options: Any) -> Pushed:
    return push_path(path, url, storage_options=options or None, transfer=FAST)


def _meta(path: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((path.parent / "meta.json").read_text())
    return meta


def _blob_gets(proxy: FaultProxy) -> int:
    return proxy.count(lambda m, p: m == "GET" and "/blobs/" in p)


# -- what an artifact becomes ------------------------------------------------------------------


def test_a_one_layer_artifact_is_a_file_named_by_its_title_and_loads_by_its_suffix(
    open_registry: Registry, fake_weights: Callable[..., Path], cache: Cache
) -> None:
    import torch
    from safetensors.torch import load_file

    weights = fake_weights("safetensors", size_bytes=256 * 1024)
    url = _url(open_registry, _repository())
    pushed = _push(weights, url)
    handle = ModelHandle("tagger", source=url, cache=cache)
    state = handle.get()
    expected = load_file(weights)
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    path = handle.fetch()
    assert path.name == weights.name
    assert path.read_bytes() == weights.read_bytes()
    meta = _meta(path)
    assert meta["kind"] == "file"
    assert meta["oci"] == {"requested": "v1", "digest": pushed.digest, "manifest": pushed.digest}
    status = handle.status()
    assert status["state"] == "ready"
    assert status["source"] == url


def test_several_layers_make_a_directory_and_include_picks_layers_by_title(
    open_registry: Registry, cache: Cache, tmp_path: Path
) -> None:
    files = {"model.safetensors": make_payload(4000, 1), "tok/vocab.txt": b"a\nb\n"}
    repository = _repository()
    url = _url(open_registry, repository)
    _push(_files(tmp_path / "minilm", files), url)
    path = cache.fetch(url)
    assert path.is_dir()
    assert path.name == repository.rsplit("/", 1)[-1]
    assert {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*.*")} == files
    only = cache.fetch(url + "?include=tok/")
    assert [p.relative_to(only).as_posix() for p in only.rglob("*") if p.is_file()] == [
        "tok/vocab.txt"
    ]
    with pytest.raises(SourceError, match=r"no layer .* has a title matching include=\*\.onnx"):
        cache.fetch(url + "?include=*.onnx")


def test_a_reference_that_names_nothing_is_a_source_error_naming_it(
    open_registry: Registry, cache: Cache, tmp_path: Path
) -> None:
    repository = _repository()
    _push(_files(tmp_path / "m", {"w.bin": b"weights"}), _url(open_registry, repository))
    missing = _url(open_registry, repository, "nope")
    with pytest.raises(SourceError, match="MANIFEST_UNKNOWN") as caught:
        ModelHandle("m", source=missing, cache=cache).fetch()
    assert caught.value.status == 404
    assert caught.value.model == "m"
    assert caught.value.source == missing
    with pytest.raises(SourceError, match="bad URL: bad repository name 'Org/M'"):
        cache.fetch(f"oci://{open_registry.address}/Org/M:v1")
    assert cache.entries() == []


# -- warm starts, tags, offline ----------------------------------------------------------------


def test_a_pinned_source_and_a_recorded_tag_start_warm_with_the_registry_stopped(
    tmp_path: Path,
) -> None:
    registry = start_registry(tmp_path / "registry")
    try:
        tag = _url(registry, _repository())
        pushed = _push(_files(tmp_path / "m", {"w.bin": b"weights"}), tag)
        pinned = pushed.reference.replace(":v1@", "@")
        home = tmp_path / "home"
        first = Cache(home, read_only_paths=[], offline=False, transfer=FAST)
        assert not first.fetch_details(pinned).cache_hit
        assert first.fetch_details(tag).cache_hit is False
    finally:
        registry.stop()
    assert registry.process.poll() is not None
    again = Cache(home, read_only_paths=[], offline=False, transfer=FAST)
    for url in (pinned, pushed.reference):  # the tag beside the digest names the same entry
        got = again.fetch_details(url)
        assert got.cache_hit
        assert got.path.read_bytes() == b"weights"
    handle = ModelHandle("w", source=pinned, cache=again, loader=lambda p: p.read_bytes())
    assert handle.get() == b"weights"
    offline = Cache(home, read_only_paths=[], offline=True)
    got = offline.fetch_details(tag)
    assert got.cache_hit
    assert _meta(got.path)["oci"]["digest"] == pushed.digest
    with pytest.raises(NotCachedError, match="modelcache fetch oci://"):
        offline.fetch(tag.replace(":v1", ":v2"))


def test_a_tag_is_resolved_once_and_moves_with_refresh_or_reload(
    open_registry: Registry, proxy_of: ProxyOf, cache: Cache, tmp_path: Path
) -> None:
    proxy = proxy_of(open_registry)
    url = _url(proxy, _repository())
    first = _push(_files(tmp_path / "a", {"w.bin": b"version one"}), url)
    assert cache.fetch(url).read_bytes() == b"version one"
    second = _push(_files(tmp_path / "b", {"w.bin": b"version two"}), url)
    proxy.clear()
    got = cache.fetch_details(url)
    assert got.cache_hit
    assert got.path.read_bytes() == b"version one"
    assert proxy.requests == []
    assert _meta(got.path)["oci"]["digest"] == first.digest

    moved = cache.fetch_details(url, refresh=True)
    assert not moved.cache_hit
    assert moved.path.read_bytes() == b"version two"
    assert _meta(moved.path)["oci"]["digest"] == second.digest

    handle = ModelHandle("w", source=url, cache=cache, loader=lambda p: p.read_bytes())
    assert handle.get() == b"version two"
    _push(_files(tmp_path / "c", {"w.bin": b"version three"}), url)
    handle.reload()
    wait_for(lambda: handle.get() == b"version three", what="the reload to swap")


# -- blobs shared with other sources, faults ---------------------------------------------------


def test_a_layer_another_source_brought_is_not_fetched_again(
    open_registry: Registry, proxy_of: ProxyOf, model_server: Any, cache: Cache, tmp_path: Path
) -> None:
    data = make_payload(MiB, seed=3)
    by_http = cache.fetch(model_server.add("w.safetensors", data))
    proxy = proxy_of(open_registry)
    url = _url(proxy, _repository())
    _push(_files(tmp_path / "m", {"w.safetensors": data}), url)
    proxy.clear()
    got = cache.fetch_details(url)
    assert not got.cache_hit
    assert got.path.read_bytes() == data
    assert _blob_gets(proxy) == 0
    assert proxy.count(lambda m, p: "/manifests/" in p) == 1
    assert got.path.stat().st_ino == by_http.stat().st_ino  # one copy of the bytes
    other_tag = url.replace(":v1", ":v2")
    _push(_files(tmp_path / "m", {"w.safetensors": data}), other_tag)
    proxy.clear()
    named = cache.fetch(other_tag, sha256=sha(data))  # the name comes from the manifest
    assert (named.name, named.stat().st_ino) == ("w.safetensors", by_http.stat().st_ino)
    assert _blob_gets(proxy) == 0


def test_a_cut_layer_download_resumes_with_ranged_gets_and_errors_are_retried(
    open_registry: Registry, proxy_of: ProxyOf, cache: Cache, tmp_path: Path
) -> None:
    data = make_payload(2 * MiB + 7, seed=4)
    proxy = proxy_of(open_registry)
    url = _url(proxy, _repository())
    _push(_files(tmp_path / "m", {"w.bin": data}), url)
    proxy.clear()
    proxy.fail(times=1, status=503, match=lambda m, p: "/manifests/" in p)
    proxy.cut(after=MiB + 123, times=1, match=lambda m, p: m == "GET" and "/blobs/" in p)
    assert cache.fetch(url).read_bytes() == data
    resumed = [
        h.get("Range", "")
        for (m, p), h in zip(proxy.requests, proxy.headers, strict=True)
        if m == "GET" and "/blobs/" in p
    ]
    assert any(r.startswith("bytes=") and not r.startswith("bytes=0-") for r in resumed)


def test_bytes_that_are_not_their_digest_are_an_integrity_error_and_nothing_is_cached(
    open_registry: Registry, cache: Cache, tmp_path: Path
) -> None:
    data = make_payload(300_000, seed=5)
    url = _url(open_registry, _repository())
    pushed = _push(_files(tmp_path / "m", {"w.bin": data}), url)
    layer_digest = f"sha256:{sha(data)}"
    stored = open_registry.blob_file(layer_digest)
    stored.chmod(stored.stat().st_mode | stat.S_IWUSR)
    flipped = bytearray(data)
    flipped[1000] ^= 0xFF
    stored.write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match="sha256 mismatch") as caught:
        ModelHandle("w", source=url, cache=cache).fetch()
    assert caught.value.source == url
    assert caught.value.model == "w"

    stored.write_bytes(data + b"tail")  # a longer blob: refused while streaming
    with pytest.raises(IntegrityError, match=f"serves {len(data) + 4} bytes for a layer of"):
        cache.fetch(url)

    stored.write_bytes(data)
    manifest = open_registry.blob_file(pushed.digest)
    manifest.write_text(manifest.read_text().replace("w.bin", "x.bin"))
    with pytest.raises(IntegrityError, match=f"not {pushed.digest}"):
        cache.fetch(pushed.reference)
    assert cache.entries() == []
    assert not list(cache.path.glob("blobs/*"))


# -- credentials -------------------------------------------------------------------------------


def test_credentials_and_tokens_never_appear_in_logs_errors_status_or_metadata(
    token_registry: Registry, cache: Cache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert token_registry.token_server is not None
    caplog.set_level(logging.DEBUG, logger="modelcache")
    url = _url(token_registry, _repository())
    login = {"oci": {"username": USER, "password": PASSWORD}}
    _push(_files(tmp_path / "m", {"w.safetensors": b"w" * 100}), url, **login["oci"])
    handle = ModelHandle(
        "private", source=url, cache=cache, storage_options=login, loader=lambda p: p.read_bytes()
    )
    assert handle.get() == b"w" * 100
    wrong = ModelHandle(
        "wrong",
        source=url.replace(":v1", ":v2"),
        cache=cache,
        storage_options={"oci": {"username": USER, "password": "not-the-password"}},
    )
    with pytest.raises(SourceError, match="refused the credentials") as caught:
        wrong.fetch()
    issued = token_registry.token_server.issued
    assert issued
    shown = [
        caplog.text,
        str(caught.value),
        repr(caught.value),
        json.dumps(handle.status()),
        json.dumps(wrong.status()),
        *(p.read_text() for p in cache.path.rglob("meta.json")),
    ]
    for secret in (PASSWORD, "not-the-password", *issued):
        assert not any(secret in text for text in shown), secret


# -- mirror ------------------------------------------------------------------------------------


def test_mirror_pushes_an_entry_that_oras_pulls_back_and_a_second_mirror_uploads_nothing(
    open_registry: Registry, proxy_of: ProxyOf, cache: Cache, tmp_path: Path
) -> None:
    import oras.client

    files = {
        "model.safetensors": make_payload(MiB + 3, seed=6),
        "tok/vocab.txt": b"a\nb\n",
        "README.md": b"# minilm\n",
    }
    model = _files(tmp_path / "minilm", files)
    proxy = proxy_of(open_registry)
    repository = _repository()
    dest = _url(proxy, repository)
    done = mirror(model, dest, cache=cache)
    assert done.dest == f"{dest}@{done.digest}"
    assert (done.files, done.copied, done.size) == (3, 3, sum(map(len, files.values())))

    pulled = tmp_path / "pulled"
    oras_client = oras.client.OrasClient(hostname=open_registry.address, insecure=True)
    oras_client.pull(target=f"{open_registry.address}/{repository}:v1", outdir=str(pulled))
    assert {p.relative_to(pulled).as_posix(): p.read_bytes() for p in pulled.rglob("*.*")} == files
    manifest = oras_client.get_manifest(f"{open_registry.address}/{repository}:v1")
    assert manifest["artifactType"] == ARTIFACT_TYPE

    proxy.clear()
    again = mirror(model, dest, cache=cache)
    assert (again.copied, again.digest) == (0, done.digest)
    assert proxy.count(lambda m, p: m in ("POST", "PATCH") and "/blobs/" in p) == 0
    assert proxy.count(lambda m, p: m == "HEAD" and "/blobs/" in p) == 4  # 3 files, a config

    back = cache.fetch(done.dest)
    assert {p.relative_to(back).as_posix(): p.read_bytes() for p in back.rglob("*.*")} == files


def test_the_cli_mirrors_a_cached_oci_model_to_another_repository_by_mounting_its_blobs(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    data = make_payload(200_000, seed=7)
    proxy = proxy_of(open_registry)
    source = _url(proxy, _repository())
    _push(_files(tmp_path / "m", {"tagger.safetensors": data}), source)
    proxy.clear()
    dest = _url(proxy, _repository(), "prod")
    home = tmp_path / "home"
    result = subprocess.run(
        [sys.executable, "-m", "modelcache", "mirror", source, dest, "--cache", str(home)],
        capture_output=True,
        text=True,
        env={**os.environ, "MODELCACHE_PROGRESS": "0"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.startswith(dest + "@sha256:")
    assert "1 of 1 file copied" in result.stderr
    layer = f"sha256:{sha(data)}"
    assert proxy.count(lambda m, p: m == "POST" and f"mount={layer}" in p) == 1
    assert proxy.count(lambda m, p: m == "PUT" and f"digest={layer}" in p) == 0  # not uploaded
    got = Cache(tmp_path / "other", read_only_paths=[], transfer=FAST).fetch(printed)
    assert (got.name, got.read_bytes()) == ("tagger.safetensors", data)


# -- the how-to page ---------------------------------------------------------------------------


def test_the_oci_page_examples_run_against_a_registry_with_token_auth(
    token_registry: Registry,
    model_server: Any,
    fake_weights: Callable[..., Path],
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from safetensors.torch import load_file

    weights = fake_weights("safetensors", size_bytes=64 * 1024)
    model_server.add("v1/tagger.safetensors", weights.read_bytes())
    login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()  # as `docker login` writes
    docker = tmp_path / "docker"
    docker.mkdir()
    (docker / "config.json").write_text(
        json.dumps({"auths": {token_registry.address: {"auth": login}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("REGISTRY_USER", USER)
    monkeypatch.setenv("REGISTRY_PASSWORD", PASSWORD)
    swap = {EXAMPLE_HOST: model_server.url, "registry.example.com": token_registry.address}

    (console,) = code_blocks("oci.md", "console")
    command = console.removeprefix("$ modelcache ")
    for example, real in swap.items():
        command = command.replace(example, real)
    done = subprocess.run(
        [sys.executable, "-m", "modelcache", *command.split()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"oci://{token_registry.address}/models/tagger:v1@sha256:")

    namespace = run_python_blocks("oci.md", model_server.url, swap)
    try:
        assert namespace["pushed"].copied == 0  # the console command pushed it already
        expected = load_file(weights)
        assert set(namespace["weights"]) == set(expected)
        assert all(torch.equal(namespace["weights"][k], expected[k]) for k in expected)
        assert namespace["moved"].path.read_bytes() == weights.read_bytes()
        assert namespace["private"].ready
        (record,) = code_blocks("oci.md", "json")
        real = _meta(namespace["first"].path)["oci"]
        assert set(json.loads(record)["oci"]) == set(real)
        assert real["digest"] == namespace["pushed"].digest
    finally:
        for name in ("tagger", "private"):
            namespace[name].close()
