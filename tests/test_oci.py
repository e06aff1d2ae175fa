"""The OCI protocol layer against Debian's real docker-registry (open, token auth, Basic+TLS).

Pushes go through modelcache's own push code; reads through its client and the transfer
engine; faults are real (a proxy that cuts or refuses, bytes flipped in the registry's store).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FAST, MiB, make_payload
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
)
from modelcache._oci._client import OCI_INDEX
from modelcache.sources import Source
from modelcache.testing import ModelServer
from modelcache.transfer import FatalError, TransferOptions, download
from servers.proxy import FaultProxy
from servers.registry import PASSWORD, USER, Registry, start_registry



# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry without auth, plain http on 127.0.0.1."""
    registry = start_registry(tmp_path_factory.mktemp("registry-open"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with token auth: anonymous pull, ``USER``/``PASSWORD`` push."""
    registry = start_registry(tmp_path_factory.mktemp("registry-token"), auth="token")
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """docker-registry with htpasswd (Basic) auth over TLS; ``ca_file`` is its CA."""
    registry = start_registry(tmp_path_factory.mktemp("registry-basic"), auth="htpasswd")
    yield registry
    registry.stop()



@pytest.fixture(autouse=True)
def _no_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No credential of the developer's own Docker config is ever read."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


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


@pytest.fixture
def proxy_of(request: pytest.FixtureRequest) -> Iterator[object]:
    """``proxy_of(registry)``: a counting, fault-injecting proxy in front of a registry."""
    proxies: list[FaultProxy] = []

    def make(registry: Registry) -> FaultProxy:
        proxy = FaultProxy(registry.url)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


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
    assert ref.pinned and ref.manifest_reference == digest and ref.host == "registry.example"
    latest = parse_reference("oci://ghcr.io/org/model")
    assert (latest.tag, latest.digest, latest.pinned) == ("latest", None, False)
    hub = parse_reference("oci://docker.io/ubuntu:24.04")
    assert (hub.repository, hub.api_host) == ("library/ubuntu", "registry-1.docker.io")
    chosen = parse_reference("oci://127.0.0.1:5000/m:t?include=*.json,tok/&exclude=a.bin")
    assert chosen.selection.include == ("*.json", "tok/")
    assert chosen.selection.wants("x.json") and not chosen.selection.wants("a.bin")
    assert chosen.loopback and not ref.loopback
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
    assert "hunter22" not in str(caught.value) and "abcdef" not in str(caught.value)


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
    assert pushed.files == 3 and pushed.uploaded == 4 and pushed.skipped == 0
    assert pushed.reference.endswith(f":v1@{pushed.digest}")

    artifact = client.artifact(reference)
    assert artifact.digest == artifact.pinned == pushed.digest
    assert artifact.artifact_type == ARTIFACT_TYPE and artifact.kind == "directory"
    assert {(l.title, l.size) for l in artifact.layers} == {(n, len(d)) for n, d in files.items()}
    types = {l.title: l.media_type for l in artifact.layers}
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
        "diffIds": [l["digest"] for l in manifest.document["layers"]],
    }
    for name, data in files.items():
        assert _fetch(client, reference, name, tmp_path / f"{uuid.uuid4().hex}.part") == data
    assert artifact.meta == {
        "oci": {"tag": "v1", "digest": pushed.digest, "manifest": pushed.digest}
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
    assert artifact.kind == "file" and [l.name for l in artifact.select()] == ["tiny.pt"]

    many = _ref(open_registry, _repo())
    model = _model(tmp_path / "m", {"a.json": b"{}", "w/b.safetensors": b"x" * 10, "c.md": b"c"})
    push(client, many, collect_files(model))
    chosen = parse_reference(f"{many.url()}?include=*.json,w/&exclude=c.md")
    assert [l.title for l in client.artifact(chosen).select()] == ["a.json", "w/b.safetensors"]
    nothing = parse_reference(f"{many.url()}?include=*.onnx")
    with pytest.raises(FatalError, match=r"include=\*\.onnx") as caught:
        client.artifact(nothing).select()
    assert caught.value.status == 404


def test_a_tag_resolves_to_its_current_digest_and_a_pinned_one_needs_no_request(
    open_registry: Registry, proxy_of: object, tmp_path: Path
) -> None:
    proxy = proxy_of(open_registry)  # type: ignore[operator]
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
    assert old.digest == first.digest and old.layers[0].size == 3
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
    assert artifact.pinned == index_digest and artifact.digest == pushed[0].digest
    assert [l.title for l in artifact.layers] == ["first.bin"]
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
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config_digest, "size": 2},
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
    untitled = dict(manifest, layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": 4}])
    client.put_manifest(repository, "image", json.dumps(untitled).encode(), manifest["mediaType"])
    with pytest.raises(FatalError, match="container image"):
        client.artifact(_ref(open_registry, repository, "image"))
