"""The OCI protocol layer against Debian's real docker-registry (open, token auth, Basic+TLS).

Pushes go through modelcache's own push code; reads through its client and the transfer
engine; faults are real (a proxy that cuts or refuses, bytes flipped in the registry's store).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import stat
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FAST, MiB, ProxyOf, make_payload
from servers.proxy import FaultProxy
from servers.registry import PASSWORD, USER, Registry

from modelcache._oci import (
    ANNOTATION_TITLE,
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    DigestError,
    Reference,
    RegistryClient,
    collect_files,
    parse_reference,
    push,
    push_path,
)
from modelcache._oci._manifest import OCI_INDEX
from modelcache._sources import Source
from modelcache._transfer import FatalError, TransferOptions, download
from modelcache.testing import ModelServer

# -- helpers ------------------------------------------------------------------------------------


def _repo() -> str:
    return f"test/m{uuid.uuid4().hex[:10]}"


def _ref(registry: Registry | FaultProxy, repository: str, tag: str = "v1") -> Reference:
    address = registry.address if isinstance(registry, Registry) else registry.url[7:]
    return parse_reference(f"oci://{address}/{repository}:{tag}")


def _model(directory: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def _client(address: str, transfer: TransferOptions = FAST, **options: object) -> RegistryClient:
    return RegistryClient(address, options, transfer=transfer)


def _fetch(client: RegistryClient, reference: Reference, layer_title: str, part: Path) -> bytes:
    artifact = client.artifact(reference)
    (layer,) = [layer for layer in artifact.layers if layer.title == layer_title]
    reader = client.blob_reader(reference.repository, layer, client.transfer)
    result = download(reader, part, options=client.transfer)
    assert result.sha256 == reader.declared_sha256
    return part.read_bytes()


def _blob_requests(proxy: FaultProxy, method: str) -> int:
    return proxy.count(lambda m, p: m == method and "/blobs/" in p)


# -- references ---------------------------------------------------------------------------------


def test_references_parse_port_tag_digest_and_selection() -> None:
    digest = "sha256:" + "ab" * 32
    ref = parse_reference(f"oci://Registry.Example:5000/org/sub/model:v1.2@{digest}")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        "registry.example:5000",
        "org/sub/model",
        "v1.2",
        digest,
    )
    assert ref.pinned
    assert ref.manifest_reference == digest
    assert ref.host == "registry.example"
    latest = parse_reference("oci://ghcr.io/org/model")
    assert (latest.tag, latest.digest, latest.pinned) == ("latest", None, False)
    hub = parse_reference("oci://docker.io/ubuntu:24.04")
    assert (hub.repository, hub.api_host) == ("library/ubuntu", "registry-1.docker.io")
    chosen = parse_reference("oci://127.0.0.1:5000/m:t?include=*.json,tok/&exclude=a.bin")
    assert chosen.selection.include == ("*.json", "tok/")
    assert chosen.selection.wants("x.json")
    assert not chosen.selection.wants("a.bin")
    assert chosen.loopback
    assert not ref.loopback
    assert str(chosen) == "oci://127.0.0.1:5000/m:t?include=*.json,tok/&exclude=a.bin"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("oci://user:hunter22@ghcr.io/org/m:v1", "cannot carry credentials"),
        ("oci://ghcr.io/org/m@sha256:1234", "bad digest"),
        ("oci://ghcr.io/Org/Model:v1", "bad repository name"),
        ("oci://ghcr.io/org/m:-bad", "bad tag"),
        ("oci://ghcr.io/", "expected oci://"),
        ("oci://ghcr.io/org/m:v1?token=abcdef", "unknown parameter"),
    ],
)
def test_bad_references_say_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_reference(url)
    assert "hunter22" not in str(caught.value)
    assert "abcdef" not in str(caught.value)


def test_transport_is_https_unless_loopback_or_asked() -> None:
    assert _client("127.0.0.1:5000").base == "http://127.0.0.1:5000"
    assert _client("localhost:5000").base == "http://localhost:5000"
    assert _client("registry.example:5000").base == "https://registry.example:5000"
    assert _client("docker.io").base == "https://registry-1.docker.io"
    assert _client("registry.example", plain_http=True).base == "http://registry.example"
    assert _client("127.0.0.1:5000", plain_http=False).base == "https://127.0.0.1:5000"
    with pytest.raises(FatalError, match="unknown oci storage option"):
        _client("registry.example", pasword="x")


def test_oci_storage_options_are_picked_out_of_a_nested_mapping() -> None:
    source = Source.parse(
        "oci://ghcr.io/org/m:v1", {"oci": {"username": "u", "password": "pw-1234"}, "s3": {}}
    )
    assert dict(source.storage_options) == {"username": "u", "password": "pw-1234"}
    assert "pw-1234" not in source.scrub("oops pw-1234")


# -- push and read back ----------------------------------------------------------------------


def test_pushed_files_come_back_by_title_with_a_modelpack_manifest(
    open_registry: Registry, tmp_path: Path
) -> None:
    files = {
        "model.safetensors": make_payload(3 * MiB + 17, seed=1),
        "tokenizer/tokenizer.json": b'{"vocab": {}}',
        "README.md": b"# model\n",
    }
    model = _model(tmp_path / "model", files)
    client = _client(open_registry.address)
    reference = _ref(open_registry, _repo())
    pushed = push(client, reference, collect_files(model), name="tiny")
    assert pushed.files == 3
    assert pushed.uploaded == 4
    assert pushed.skipped == 0
    assert pushed.reference.endswith(f":v1@{pushed.digest}")

    artifact = client.artifact(reference)
    assert artifact.digest == artifact.pinned == pushed.digest
    assert artifact.artifact_type == ARTIFACT_TYPE
    assert artifact.kind == "directory"
    assert {(layer.title, layer.size) for layer in artifact.layers} == {
        (n, len(d)) for n, d in files.items()
    }
    types = {layer.title: layer.media_type for layer in artifact.layers}
    assert types == {
        "model.safetensors": "application/vnd.cncf.model.weight.v1.raw",
        "tokenizer/tokenizer.json": "application/vnd.cncf.model.weight.config.v1.raw",
        "README.md": "application/vnd.cncf.model.doc.v1.raw",
    }
    manifest = client.manifest(reference.repository, pushed.digest)
    config_descriptor = manifest.document["config"]
    assert config_descriptor["mediaType"] == CONFIG_TYPE
    config = json.loads(open_registry.blob_file(config_descriptor["digest"]).read_bytes())
    assert config["descriptor"] == {"name": "tiny"}
    assert config["config"] == {"format": "safetensors"}
    assert config["modelfs"] == {
        "type": "layers",
        "diffIds": [layer["digest"] for layer in manifest.document["layers"]],
    }
    for name, data in files.items():
        assert _fetch(client, reference, name, tmp_path / f"{uuid.uuid4().hex}.part") == data
    assert artifact.meta == {
        "oci": {"requested": "v1", "digest": pushed.digest, "manifest": pushed.digest}
    }


def test_one_file_artifact_is_a_file_and_selection_picks_layers(
    open_registry: Registry, tmp_path: Path
) -> None:
    client = _client(open_registry.address)
    single = _ref(open_registry, _repo())
    weights = tmp_path / "tiny.pt"
    weights.write_bytes(make_payload(1000, seed=2))
    push(client, single, collect_files(weights))
    artifact = client.artifact(single)
    assert artifact.files() == [("", artifact.layers[0])]
    assert artifact.name == "tiny.pt"
    assert artifact.kind == "file"
    assert [layer.name for layer in artifact.select()] == ["tiny.pt"]

    many = _ref(open_registry, _repo())
    model = _model(tmp_path / "m", {"a.json": b"{}", "w/b.safetensors": b"x" * 10, "c.md": b"c"})
    push(client, many, collect_files(model))
    assert [path for path, _ in client.artifact(many).files()] == [
        "a.json",
        "c.md",
        "w/b.safetensors",
    ]
    assert client.artifact(many).name == many.repository.rsplit("/", 1)[-1]
    chosen = parse_reference(f"{many.url()}?include=*.json,w/&exclude=c.md")
    assert [layer.title for layer in client.artifact(chosen).select()] == [
        "a.json",
        "w/b.safetensors",
    ]
    nothing = parse_reference(f"{many.url()}?include=*.onnx")
    with pytest.raises(FatalError, match=r"include=\*\.onnx") as caught:
        client.artifact(nothing).select()
    assert caught.value.status == 404


def test_a_tag_resolves_to_its_current_digest_and_a_pinned_one_needs_no_request(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    proxy = proxy_of(open_registry)
    client = _client(proxy.url[7:])
    repository = _repo()
    reference = _ref(proxy, repository, "prod")
    first = push(client, reference, collect_files(_model(tmp_path / "1", {"w.bin": b"one"})))
    assert client.resolve(reference) == first.digest
    second = push(client, reference, collect_files(_model(tmp_path / "2", {"w.bin": b"two"})))
    assert second.digest != first.digest
    assert client.resolve(reference) == second.digest  # the tag moved
    pinned = reference.at(first.digest)
    proxy.clear()
    assert client.resolve(pinned) == first.digest
    assert proxy.requests == []  # a digest-pinned reference resolves with no request
    old = client.artifact(pinned)
    assert old.digest == first.digest
    assert old.layers[0].size == 3
    assert _fetch(client, pinned, "w.bin", tmp_path / "old.part") == b"one"


def test_an_index_resolves_to_its_first_manifest(open_registry: Registry, tmp_path: Path) -> None:
    client = _client(open_registry.address)
    repository = _repo()
    by_digest = parse_reference(f"oci://{open_registry.address}/{repository}@sha256:{'0' * 64}")
    pushed = []
    for name, data in (("first.bin", b"first"), ("second.bin", b"second")):
        files = collect_files(_model(tmp_path / name, {name: data}))
        from modelcache._oci import build_manifest

        digest = "sha256:" + hashlib.sha256(build_manifest(files)[1]).hexdigest()
        pushed.append(push(client, Reference(by_digest.registry, repository, None, digest), files))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": p.digest,
                "size": len(client.manifest(repository, p.digest).raw),
            }
            for p in pushed
        ],
    }
    raw = json.dumps(index).encode()
    index_digest = client.put_manifest(repository, "multi", raw, OCI_INDEX)
    reference = _ref(open_registry, repository, "multi")
    assert client.resolve(reference) == index_digest
    artifact = client.artifact(reference)
    assert artifact.pinned == index_digest
    assert artifact.digest == pushed[0].digest
    assert [layer.title for layer in artifact.layers] == ["first.bin"]
    assert artifact.reference.digest == index_digest


def test_layer_titles_must_stay_inside_the_entry(open_registry: Registry) -> None:
    client = _client(open_registry.address)
    repository = _repo()
    data = b"evil"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    client.upload_blob(repository, lambda: __import__("io").BytesIO(data), digest, len(data))
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    client.upload_blob(repository, lambda: __import__("io").BytesIO(config), config_digest, 2)
    for title in ("../escape.bin", "/etc/passwd", "a/./b"):
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": config_digest,
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/octet-stream",
                    "digest": digest,
                    "size": len(data),
                    "annotations": {ANNOTATION_TITLE: title},
                }
            ],
        }
        raw = json.dumps(manifest).encode()
        client.put_manifest(repository, "bad", raw, "application/vnd.oci.image.manifest.v1+json")
        with pytest.raises(FatalError, match="not a relative path inside the entry"):
            client.artifact(_ref(open_registry, repository, "bad"))
    untitled = dict(
        manifest,
        layers=[
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": 4,
            }
        ],
    )
    client.put_manifest(repository, "image", json.dumps(untitled).encode(), manifest["mediaType"])
    with pytest.raises(FatalError, match="container image"):
        client.artifact(_ref(open_registry, repository, "image"))


# -- bytes: ranges, resume, verification ----------------------------------------------------------


def test_a_blob_range_is_served_from_an_offset(open_registry: Registry, tmp_path: Path) -> None:
    data = make_payload(2 * MiB, seed=3)
    client = _client(open_registry.address)
    reference = _ref(open_registry, _repo())
    push(client, reference, collect_files(_model(tmp_path / "m", {"w.bin": data})))
    (layer,) = client.artifact(reference).layers
    stream = client.blob_reader(reference.repository, layer, FAST).open(1000, 5000, None)
    try:
        assert (stream.start, stream.size, stream.ranged) == (1000, len(data), True)
        assert b"".join(stream.pieces) == data[1000:5000]
    finally:
        stream.close()


def test_a_cut_download_resumes_with_ranged_gets_and_is_verified(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    data = make_payload(6 * MiB, seed=4)
    proxy = proxy_of(open_registry)
    client = _client(proxy.url[7:])
    reference = _ref(proxy, _repo())
    push(client, reference, collect_files(_model(tmp_path / "m", {"w.bin": data})))
    (layer,) = client.artifact(reference).layers
    proxy.clear()
    proxy.cut(after=1 * MiB + 123, times=2, match=lambda m, p: m == "GET" and "/blobs/" in p)
    one_stream = TransferOptions(**{**FAST.__dict__, "connections": 1})
    reader = client.blob_reader(reference.repository, layer, one_stream)
    result = download(reader, tmp_path / "w.part", options=one_stream)
    assert result.sha256 == layer.sha256 == reader.declared_sha256
    assert (tmp_path / "w.part").read_bytes() == data
    assert _blob_requests(proxy, "GET") == 3  # two cut, each resumed where it stopped
    assert result.fetched < len(data) + 512 * 1024  # nothing fetched twice (beyond a piece)


def test_a_blob_whose_bytes_changed_in_the_registry_does_not_pass(
    open_registry: Registry, tmp_path: Path
) -> None:
    data = make_payload(1 * MiB, seed=5)
    client = _client(open_registry.address)
    reference = _ref(open_registry, _repo())
    pushed = push(client, reference, collect_files(_model(tmp_path / "m", {"w.bin": data})))
    (layer,) = client.artifact(reference).layers
    stored = open_registry.blob_file(layer.digest)
    flipped = bytearray(stored.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    stored.chmod(stored.stat().st_mode | stat.S_IWUSR)
    stored.write_bytes(bytes(flipped))
    reader = client.blob_reader(reference.repository, layer, FAST)
    result = download(reader, tmp_path / "flipped.part", options=FAST)
    assert result.size == layer.size
    assert result.sha256 != reader.declared_sha256

    stored.write_bytes(bytes(flipped[:-10]))  # a shorter blob: refused while streaming
    with pytest.raises(DigestError, match=f"serves {layer.size - 10} bytes for a layer of"):
        download(reader, tmp_path / "short.part", options=FAST)

    manifest_file = open_registry.blob_file(pushed.digest)
    text = manifest_file.read_text().replace("w.bin", "x.bin")
    manifest_file.write_text(text)
    with pytest.raises(DigestError, match=f"not {pushed.digest}"):
        client.artifact(reference.at(pushed.digest))


def test_transient_registry_errors_are_retried_and_permanent_ones_named(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    proxy = proxy_of(open_registry)
    client = _client(proxy.url[7:])
    reference = _ref(proxy, _repo())
    push(client, reference, collect_files(_model(tmp_path / "m", {"w.bin": b"weights"})))
    proxy.fail(times=2, status=503, match=lambda m, p: "/manifests/" in p)
    proxy.fail(times=1, status=429, match=lambda m, p: m == "GET" and "/blobs/" in p)
    assert _fetch(client, reference, "w.bin", tmp_path / "w.part") == b"weights"
    missing = _ref(proxy, reference.repository, "nope")
    with pytest.raises(FatalError, match="MANIFEST_UNKNOWN") as caught:
        client.artifact(missing)
    assert caught.value.status == 404
    proxy.fail(times=10, status=503, match=lambda m, p: "/manifests/" in p)
    with pytest.raises(FatalError, match="gave up after 4 attempts"):
        client.resolve(reference)


# -- pushing: chunks, HEAD first, mounts -------------------------------------------------------


def test_a_large_blob_goes_up_in_chunks(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    data = make_payload(3 * MiB + 5, seed=6)
    proxy = proxy_of(open_registry)
    client = _client(proxy.url[7:], upload_chunk_size=1 * MiB)
    reference = _ref(proxy, _repo())
    push(client, reference, collect_files(_model(tmp_path / "m", {"big.safetensors": data})))
    assert _blob_requests(proxy, "PATCH") == 4  # 3 full chunks and the tail
    assert _fetch(client, reference, "big.safetensors", tmp_path / "big.part") == data


def test_blobs_the_registry_has_are_not_uploaded_again(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    proxy = proxy_of(open_registry)
    client = _client(proxy.url[7:])
    repository = _repo()
    shared = make_payload(MiB, seed=7)
    model = _model(tmp_path / "m", {"w.safetensors": shared, "config.json": b'{"v": 1}'})
    push(client, _ref(proxy, repository, "v1"), collect_files(model))
    proxy.clear()
    again = push(client, _ref(proxy, repository, "v1"), collect_files(model))
    assert (again.uploaded, again.skipped) == (0, 3)
    assert _blob_requests(proxy, "HEAD") == 3
    assert _blob_requests(proxy, "POST") == _blob_requests(proxy, "PUT") == 0
    assert proxy.count(lambda m, p: m == "PUT" and "/manifests/" in p) == 1

    (model / "config.json").write_bytes(b'{"v": 2}')
    proxy.clear()
    changed = push(client, _ref(proxy, repository, "v2"), collect_files(model))
    assert (changed.uploaded, changed.skipped) == (2, 1)  # the new config file and config blob
    assert _blob_requests(proxy, "POST") == 2


def test_blobs_of_another_repository_are_mounted(
    open_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    proxy = proxy_of(open_registry)
    client = _client(proxy.url[7:])
    origin, copy = _repo(), _repo()
    model = _model(tmp_path / "m", {"w.bin": make_payload(MiB, seed=8), "c.json": b"{}"})
    push(client, _ref(proxy, origin), collect_files(model))
    proxy.clear()
    mirrored = push(client, _ref(proxy, copy), collect_files(model), mount_from=origin)
    assert (mirrored.mounted, mirrored.uploaded) == (3, 0)
    assert _blob_requests(proxy, "PUT") == _blob_requests(proxy, "PATCH") == 0
    assert _fetch(client, _ref(proxy, copy), "c.json", tmp_path / "c.part") == b"{}"


# -- auth ----------------------------------------------------------------------------------------


def test_anonymous_pull_tokens_and_credentials_to_push(
    token_registry: Registry, tmp_path: Path
) -> None:
    tokens = token_registry.token_server
    assert tokens is not None
    reference = _ref(token_registry, _repo())
    model = _model(tmp_path / "m", {"w.bin": b"public weights"})
    anonymous = _client(token_registry.address)
    with pytest.raises(FatalError, match="requires credentials") as caught:
        push(anonymous, reference, collect_files(model))
    assert caught.value.status == 401

    pusher = _client(token_registry.address, username=USER, password=PASSWORD)
    push(pusher, reference, collect_files(model))
    pushes = [r for r in tokens.requests if r.user == USER]
    assert pushes
    assert pushes[-1].granted[0]["actions"] == ["pull", "push"]

    tokens.requests.clear()
    reader = _client(token_registry.address)
    assert _fetch(reader, reference, "w.bin", tmp_path / "w.part") == b"public weights"
    assert tokens.requests
    assert all(r.authorization is None for r in tokens.requests)
    assert tokens.requests[0].scopes == [f"repository:{reference.repository}:pull"]
    assert len(tokens.requests) == 1  # one token, cached for the manifest and the blob

    (layer,) = reader.artifact(reference).layers
    fresh = _client(token_registry.address)  # its first request is a blob GET: 401, a token
    blob = fresh.blob_reader(reference.repository, layer, FAST)
    result = download(blob, tmp_path / "fresh.part", options=FAST)
    assert result.sha256 == layer.sha256
    assert len(tokens.requests) == 2


def test_wrong_credentials_are_refused_without_showing_them(
    token_registry: Registry, basic_registry: Registry, tmp_path: Path
) -> None:
    for registry in (token_registry, basic_registry):
        options: dict[str, object] = {"username": USER, "password": "wrong-password-42"}
        if registry.ca_file is not None:
            options["ca_file"] = str(registry.ca_file)
        client = _client(registry.address, **options)
        model = _model(tmp_path / "m", {"w.bin": b"x"})
        with pytest.raises(
            FatalError, match="refused the credentials from storage_options"
        ) as caught:
            push(client, _ref(registry, _repo()), collect_files(model))
        assert caught.value.status == 401
        assert "wrong-password-42" not in str(caught.value)


def test_basic_auth_over_tls_with_a_private_ca(basic_registry: Registry, tmp_path: Path) -> None:
    assert basic_registry.ca_file is not None
    reference = _ref(basic_registry, _repo())
    model = _model(tmp_path / "m", {"w.bin": b"over tls"})
    client = _client(
        basic_registry.address,
        username=USER,
        password=PASSWORD,
        ca_file=str(basic_registry.ca_file),
    )
    assert client.base.startswith("https://")
    push(client, reference, collect_files(model))
    assert _fetch(client, reference, "w.bin", tmp_path / "w.part") == b"over tls"
    untrusted = _client(basic_registry.address, username=USER, password=PASSWORD, plain_http=False)
    with pytest.raises(FatalError, match="TLS error"):
        untrusted.artifact(reference)


def _docker_config(directory: Path, document: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(document))


def test_credentials_come_from_the_docker_config(
    basic_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = str(basic_registry.ca_file)
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    reference = _ref(basic_registry, _repo())
    model = _model(tmp_path / "m", {"w.bin": b"from docker config"})

    # $DOCKER_CONFIG, keyed by host:port
    _docker_config(tmp_path / "dc", {"auths": {basic_registry.address: {"auth": encoded}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    push(_client(basic_registry.address, ca_file=ca), reference, collect_files(model))

    # ~/.docker/config.json, keyed by URL (as `docker login https://...` writes it)
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    key = f"https://{basic_registry.address}/v1/"
    _docker_config(tmp_path / "home/.docker", {"auths": {key: {"auth": encoded}}})
    client = _client(basic_registry.address, ca_file=ca)
    assert _fetch(client, reference, "w.bin", tmp_path / "w.part") == b"from docker config"

    # a credential helper (docker-credential-<name> get)
    helper = tmp_path / "bin/docker-credential-modelcache-test"
    helper.parent.mkdir()
    answer = json.dumps({"ServerURL": basic_registry.address, "Username": USER, "Secret": PASSWORD})
    helper.write_text(f"#!/bin/sh\nread server\necho '{answer}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    _docker_config(
        tmp_path / "home/.docker", {"credHelpers": {basic_registry.address: "modelcache-test"}}
    )
    client = _client(basic_registry.address, ca_file=ca)
    assert _fetch(client, reference, "w.bin", tmp_path / "h.part") == b"from docker config"

    # storage_options win over the Docker config
    with pytest.raises(FatalError, match="refused the credentials from storage_options"):
        _client(basic_registry.address, ca_file=ca, username=USER, password="nope").artifact(
            reference
        )


def test_no_credential_or_token_in_logs_errors_or_reprs(
    token_registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = token_registry.token_server
    assert tokens is not None
    caplog.set_level(logging.DEBUG)
    reference = _ref(token_registry, _repo())
    model = _model(tmp_path / "m", {"w.bin": make_payload(300_000, seed=9)})
    client = _client(token_registry.address, username=USER, password=PASSWORD)
    push(client, reference, collect_files(model))
    _fetch(client, reference, "w.bin", tmp_path / "w.part")
    errors = []
    for bad in (_ref(token_registry, reference.repository, "missing"), _ref(token_registry, "x/y")):
        with pytest.raises(FatalError) as caught:
            client.artifact(bad)
        errors.append(str(caught.value))
    wrong = _client(token_registry.address, username=USER, password="Wr0ng-pass")
    with pytest.raises(FatalError) as caught:
        push(wrong, reference, collect_files(model))
    errors.append(str(caught.value))
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    secrets = [PASSWORD, "Wr0ng-pass", basic, *tokens.issued]
    assert tokens.issued
    shown = caplog.text + "\n".join(errors) + repr(client.options) + repr(client._auth)
    assert "oci: got a token" in caplog.text  # the log did run at DEBUG
    for secret in secrets:
        assert secret not in shown
    assert client.scrub(f"token was {tokens.issued[-1]}") == "token was ***"


def test_a_cross_host_redirect_drops_the_authorization_and_takes_the_later_chunks(
    token_registry: Registry, proxy_of: ProxyOf, tmp_path: Path
) -> None:
    # registries on S3 or behind a CDN redirect each blob GET to a signed URL: the chunks go
    # there directly, not through the registry (and its auth) one by one (an expired signed
    # URL sends the reader back to the origin: test_hf checks it on the Hub's CDN)
    data = make_payload(2 * MiB, seed=10)
    reference = _ref(token_registry, _repo())
    pusher = _client(token_registry.address, username=USER, password=PASSWORD)
    push(pusher, reference, collect_files(_model(tmp_path / "m", {"w.bin": data})))
    (layer,) = pusher.artifact(reference).layers

    proxy = proxy_of(token_registry)
    parallel = replace(FAST, connections=4, chunk_size=256 * 1024, split_below=math.inf)
    with ModelServer() as storage:
        signed = storage.add(f"blobs/{layer.sha256}", token_registry.blob_file(layer.digest))
        proxy.redirect(
            lambda path: f"{signed}?X-Amz-Signature=abc",
            times=100,
            match=lambda m, p: m == "GET" and "/blobs/sha256:" in p,
        )
        client = _client(proxy.url[7:], parallel, username=USER, password=PASSWORD)
        via_proxy = _ref(proxy, reference.repository)
        assert _fetch(client, via_proxy, "w.bin", tmp_path / "w.part") == data
        seen = [headers for path, headers in storage.request_headers]
    assert len(seen) >= 8  # 2 MiB in 256 KiB chunks
    assert all("authorization" not in {k.lower() for k in h} for h in seen)
    asked = [h for (m, p), h in zip(proxy.requests, proxy.headers, strict=False) if "/blobs/" in p]
    assert len(asked) == 1  # the first chunk's (the token's challenge was answered before it)
    assert asked[0]["Authorization"].startswith("Bearer ")


# -- interoperability with ORAS ----------------------------------------------------------------


def test_oras_pulls_what_modelcache_pushed_and_modelcache_reads_what_oras_pushed(
    open_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import oras.client

    files = {"model.safetensors": make_payload(MiB + 3, seed=11), "tok/vocab.txt": b"a\nb\n"}
    model = _model(tmp_path / "model", files)
    client = _client(open_registry.address)
    repository = _repo()
    push(client, _ref(open_registry, repository), collect_files(model))
    oras_client = oras.client.OrasClient(hostname=open_registry.address, insecure=True)
    out = tmp_path / "pulled"
    oras_client.pull(target=f"{open_registry.address}/{repository}:v1", outdir=str(out))
    for name, data in files.items():
        assert (out / name).read_bytes() == data

    monkeypatch.chdir(tmp_path / "model")
    oras_client.push(
        target=f"{open_registry.address}/{repository}:by-oras",
        files=["model.safetensors", "tok/vocab.txt"],
        disable_path_validation=True,
    )
    reference = _ref(open_registry, repository, "by-oras")  # oras-py titles by file name
    assert {layer.title for layer in client.artifact(reference).layers} == {
        "model.safetensors",
        "vocab.txt",
    }
    assert _fetch(client, reference, "vocab.txt", tmp_path / "v.part") == b"a\nb\n"


def test_push_path_pushes_a_file_or_a_directory_to_a_url(
    open_registry: Registry, tmp_path: Path
) -> None:
    model = _model(tmp_path / "whisper", {"model.bin": b"w" * 100, "config.json": b"{}"})
    known = {"config.json": hashlib.sha256(b"{}").hexdigest()}
    url = f"oci://{open_registry.address}/{_repo()}:tiny"
    pushed = push_path(model, url, sha256s=known, transfer=FAST)
    assert pushed.reference.startswith(url + "@sha256:")
    client = _client(open_registry.address)
    artifact = client.artifact(parse_reference(pushed.reference))
    assert sorted(layer.title for layer in artifact.layers) == ["config.json", "model.bin"]
    manifest = client.manifest(artifact.reference.repository, artifact.digest)
    config = json.loads(open_registry.blob_file(manifest.document["config"]["digest"]).read_bytes())
    assert config["descriptor"] == {"name": "whisper"}
    with pytest.raises(ValueError, match="a push destination has none"):
        push_path(model, url + "?include=*.bin")
