"""Hostile origins, each against a real server on 127.0.0.1.

Names from an origin's listing that would leave the entry (``../x``, ``/abs``, NUL, a drive
letter) are refused before any byte is fetched; bodies longer or shorter than they say, a
trickle of bytes, redirect loops, https->http redirects, a 200 to a Range request and an ETag
that changes between ranges never leave a wrong file in the cache.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, KiB, make_payload, sha
from servers.hostile import HostileServer, Request, ranged
from servers.hub import HubStandIn
from servers.registry import Registry
from servers.stores import S3Bucket

from modelcache import Cache, SourceError
from modelcache._plan import relative_path
from modelcache.testing import ModelServer

pytest_plugins = ["servers.fixtures"]


#: one attempt after a failure, quickly: the faults here are not healed by retrying
IMPATIENT = dataclasses.replace(FAST, retries=1, deadline=3.0, stall_timeout=1.0)


def final_files(home: Path) -> list[Path]:
    """Every file the cache published (blobs and refs), no part files or metadata."""
    return sorted(
        p
        for top in ("blobs", "refs")
        for p in (home / top).rglob("*")
        if p.is_file() and p.name != "meta.json"
    )


def assert_nothing_cached(cache: Cache) -> None:
    assert cache.entries() == []
    assert final_files(cache.path) == []
    assert cache.verify() == []


# -- names that would leave the entry --------------------------------------------------------------

#: (id, name) of hostile names an origin may list; ``{outside}`` is an absolute path in tmp
HOSTILE = [
    ("dot-dot", "../x"),
    ("deep-dot-dot", "sub/../../x"),
    ("absolute", "{outside}/x"),
    ("nul", "a\0b"),
    ("drive-letter", "C:/x"),
    ("backslash", "..\\x"),
]


def _named(name: str, tmp_path: Path) -> str:
    return name.replace("{outside}", str(tmp_path / "outside"))


def assert_nothing_escaped(tmp_path: Path, cache: Cache) -> None:
    """No file ``x`` anywhere (the entries' hostile files are all called ``x``), no entry."""
    assert [p for p in tmp_path.rglob("*") if p.name in ("x", "b", "\\x")] == []
    assert not (tmp_path / "outside").exists()
    assert_nothing_cached(cache)


@pytest.mark.parametrize("name", [n for _, n in HOSTILE], ids=[i for i, _ in HOSTILE])
def test_the_one_check_refuses_every_hostile_name(name: str, tmp_path: Path) -> None:
    from modelcache._transfer import FatalError

    with pytest.raises(FatalError, match="not a relative path inside the entry"):
        relative_path(_named(name, tmp_path))
    assert relative_path("sub/dir/model.safetensors") == "sub/dir/model.safetensors"


@pytest.mark.parametrize("name", [n for _, n in HOSTILE], ids=[i for i, _ in HOSTILE])
def test_a_hub_listing_with_a_hostile_name_is_refused(
    hub: HubStandIn, cache: Cache, tmp_path: Path, name: str
) -> None:
    name = _named(name, tmp_path)
    hub.push("org/evil", {"config.json": b"{}", name: make_payload(2 * KiB)})
    with pytest.raises(SourceError, match="not a relative path inside the entry") as raised:
        cache.fetch("hf://org/evil")
    assert "hf://org/evil" in str(raised.value)
    assert hub.count(lambda method, path: "/resolve/" in path) == 0  # not one byte fetched
    assert_nothing_escaped(tmp_path, cache)


#: S3 keys carry no NUL (S3's XML listing cannot); the other names are all possible keys
S3_HOSTILE = [(i, n) for i, n in HOSTILE if i != "nul"]


@pytest.mark.parametrize("name", [n for _, n in S3_HOSTILE], ids=[i for i, _ in S3_HOSTILE])
def test_an_s3_prefix_listing_a_hostile_name_is_refused(
    s3_bucket: S3Bucket, modelcache_home: Path, tmp_path: Path, name: str
) -> None:
    name = _named(name, tmp_path)
    key = "models/" + name  # an absolute name: models//tmp/.../x
    s3_bucket.put("models/config.json", b"{}")
    s3_bucket.put(key, make_payload(2 * KiB))
    answer = s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name, Prefix="models/")
    listed = [item["Key"] for item in answer["Contents"]]
    assert key in listed, f"the store normalised the key: {listed}"
    cache = Cache(modelcache_home, read_only_paths=[], offline=False, transfer=FAST)
    with pytest.raises(SourceError, match="not a relative path inside the entry"):
        cache.fetch(s3_bucket.url("models/"), storage_options=s3_bucket.options())
    assert_nothing_escaped(tmp_path, cache)


@pytest.mark.parametrize("name", [n for _, n in HOSTILE], ids=[i for i, _ in HOSTILE])
def test_an_oci_title_naming_a_hostile_path_is_refused(
    open_registry: Registry, cache: Cache, tmp_path: Path, name: str
) -> None:
    import hashlib
    import io
    import json
    import uuid

    from modelcache._oci import ANNOTATION_TITLE, RegistryClient

    name = _named(name, tmp_path)
    client = RegistryClient(open_registry.address, {}, transfer=FAST)
    repository = f"evil/m{uuid.uuid4().hex[:10]}"
    layers = []
    for title, data in (("config.json", b"{}"), (name, make_payload(2 * KiB))):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        client.upload_blob(repository, lambda d=data: io.BytesIO(d), digest, len(data))
        layers.append(
            {
                "mediaType": "application/octet-stream",
                "digest": digest,
                "size": len(data),
                "annotations": {ANNOTATION_TITLE: title},
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": layers[0]["digest"],
            "size": 2,
        },
        "layers": layers,
    }
    raw = json.dumps(manifest).encode()
    client.put_manifest(repository, "v1", raw, manifest["mediaType"])
    with pytest.raises(SourceError, match="not a relative path inside the entry"):
        cache.fetch(f"oci://{open_registry.address}/{repository}:v1")
    assert_nothing_escaped(tmp_path, cache)


# -- bodies that lie about their length -----------------------------------------------------------


def test_a_body_longer_than_its_content_length_is_cut_at_the_length(cache: Cache) -> None:
    """The bytes past Content-Length are never written, and the kept-alive connection they
    polluted is not reused for the next file."""
    first, second = make_payload(100 * KiB, 1), make_payload(50 * KiB, 2)

    def too_long(data: bytes) -> object:
        def answer(request: Request) -> None:
            request.head(200, {"Content-Length": str(len(data)), "ETag": f'"{sha(data)[:8]}"'})
            request.write(data + b"GARBAGE-PAST-THE-END" * 100)

        return answer

    with HostileServer() as server:
        url_a = server.route("/a.bin", too_long(first))
        url_b = server.route("/b.bin", too_long(second))
        got_a = cache.fetch(url_a, sha256=sha(first))
        got_b = cache.fetch(url_b)
    assert got_a.read_bytes() == first
    assert got_b.read_bytes() == second
    assert cache.verify() == []


def test_a_body_shorter_than_its_content_length_resumes_or_fails_clearly(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(512 * KiB, 3)
    url = model_server.add("short.bin", data)
    model_server.cut_after("short.bin", 200 * KiB)  # once: the next request resumes
    assert cache.fetch(url).read_bytes() == data
    assert model_server.count("short.bin")[1] < len(data) + 64 * KiB  # resumed, not restarted

    other = Cache(cache.path / "other", read_only_paths=[], offline=False, transfer=IMPATIENT)
    url = model_server.add("always-short.bin", data)
    # every answer closes before its first byte: no progress, so the retries run out (an
    # answer cut after some bytes is progress, and resumes until the file is whole)
    model_server.cut_after("always-short.bin", 0, times=100)
    with pytest.raises(SourceError, match=r"connection closed|IncompleteRead|Protocol"):
        other.fetch(url)
    assert_nothing_cached(other)


# -- a trickle: timeouts, cancel and close ---------------------------------------------------------


def trickle(size: int, every: float) -> object:
    """A file of ``size`` bytes sent one byte every ``every`` seconds."""

    def answer(request: Request) -> None:
        request.head(200, {"Content-Length": str(size), "ETag": '"t"'})
        for _ in range(size):
            if not request.write(b"x"):
                return
            time.sleep(every)

    return answer


def test_a_silent_origin_ends_in_the_stall_timeout(cache: Cache) -> None:
    options = dataclasses.replace(IMPATIENT, stall_timeout=0.5, deadline=1.0)
    quick = Cache(cache.path, read_only_paths=[], offline=False, transfer=options)
    with HostileServer() as server:
        url = server.route("/slow.bin", trickle(1000, every=2.0))
        began = time.monotonic()
        with pytest.raises(SourceError, match=r"(?i)timed? ?out"):
            quick.fetch(url)
        took = time.monotonic() - began
    assert took < 10, f"the stall timeout (0.5 s) took {took:.1f} s to end the fetch"
    assert_nothing_cached(quick)


def test_cancel_returns_promptly_from_a_trickling_origin(cache: Cache) -> None:
    cancel = threading.Event()
    errors: list[BaseException] = []
    with HostileServer() as server:
        url = server.route("/trickle.bin", trickle(10_000, every=0.05))

        def fetch() -> None:
            try:
                cache.fetch(url, cancel=cancel)
            except BaseException as error:
                errors.append(error)

        thread = threading.Thread(target=fetch)
        thread.start()
        time.sleep(0.5)
        cancel.set()
        began = time.monotonic()
        thread.join(10)
        took = time.monotonic() - began
    assert not thread.is_alive()
    assert took < 2.0, f"cancel took {took:.1f} s"
    assert len(errors) == 1
    assert isinstance(errors[0], SourceError)
    assert "cancelled" in str(errors[0])
    assert final_files(cache.path) == []


def test_registry_close_returns_promptly_while_a_model_trickles_in(modelcache_home: Path) -> None:
    from modelcache import ModelHandle, Registry

    with HostileServer() as server:
        url = server.route("/model.safetensors", trickle(10_000, every=0.05))
        handle = ModelHandle(
            "trickled",
            source=url,
            strategy="background",
            cache=Cache(modelcache_home, read_only_paths=[], offline=False, transfer=FAST),
        )
        models = Registry([handle])
        models.start()
        time.sleep(0.5)
        assert handle.status()["state"] == "fetching"
        began = time.monotonic()
        models.close()
        took = time.monotonic() - began
    assert took < 3.0, f"Registry.close() took {took:.1f} s"
    assert final_files(modelcache_home) == []


# -- redirects ------------------------------------------------------------------------------------


def test_a_redirect_loop_fails_at_once_not_after_every_retry(modelcache_home: Path) -> None:
    patient = dataclasses.replace(FAST, retries=5, backoff=1.0, deadline=60.0)
    cache = Cache(modelcache_home, read_only_paths=[], offline=False, transfer=patient)

    def to(path: str) -> object:
        def answer(request: Request) -> None:
            request.head(302, {"Location": path, "Content-Length": "0"})

        return answer

    with HostileServer() as server:
        url = server.route("/a", to("/b"))
        server.route("/b", to("/a"))
        began = time.monotonic()
        with pytest.raises(SourceError, match="redirect"):
            cache.fetch(url)
        took = time.monotonic() - began
        asked = server.requests["/a"] + server.requests["/b"]
    assert took < 5, f"a redirect loop took {took:.1f} s to fail (it was retried)"
    assert asked <= 12, f"{asked} requests for one redirect loop"
    assert_nothing_cached(cache)


def test_a_redirect_from_https_to_http_is_refused(
    cache: Cache, model_server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from servers.registry import _self_signed

    cert, key, _ = _self_signed(tmp_path, "hostile")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    data = make_payload(10 * KiB, 4)
    plain = model_server.add("weights.bin", data)
    with HostileServer(tls=(cert, key)) as server:
        server.route(
            "/weights.bin",
            lambda r: r.head(302, {"Location": plain, "Content-Length": "0"}),
        )
        server.route(
            "/fine.bin",
            lambda r: (r.head(200, {"Content-Length": str(len(data))}), r.write(data)),
        )
        elsewhere = Cache(cache.path.parent / "elsewhere", read_only_paths=[], transfer=FAST)
        assert elsewhere.fetch(server.url + "/fine.bin").read_bytes() == data  # TLS works
        with pytest.raises(SourceError, match="refused a redirect from https to http"):
            cache.fetch(server.url + "/weights.bin")
    assert model_server.count("weights.bin") == (0, 0)  # not one request over plain http
    assert_nothing_cached(cache)


# -- ranges the origin does not honour ------------------------------------------------------------


def test_a_200_answer_to_a_range_request_starts_the_part_file_over(
    cache: Cache, model_server: ModelServer
) -> None:
    data = make_payload(768 * KiB, 5)
    url = model_server.add("ignores.bin", data)
    model_server.cut_after("ignores.bin", 300 * KiB)  # a part file is left with 300 KiB
    original = model_server._content

    def then_ignore_ranges(path: str) -> bytes | Path | None:
        if model_server.requests["/ignores.bin"] > 1:
            model_server.set_ignore_range("ignores.bin")
        return original(path)

    model_server._content = then_ignore_ranges  # type: ignore[method-assign]
    got = cache.fetch(url)
    assert got.read_bytes() == data
    assert model_server.count("ignores.bin")[0] >= 2
    ranges = [h.get("Range") for p, h in model_server.request_headers if p == "/ignores.bin"]
    assert any(r and not r.startswith("bytes=0-") for r in ranges), ranges  # it did resume
    assert cache.verify() == []


@pytest.mark.parametrize("parallel", [False, True], ids=["one-stream", "parallel-ranges"])
def test_an_etag_that_changes_between_ranges_restarts_not_splices(
    modelcache_home: Path, parallel: bool
) -> None:
    """The origin swaps the file after the first answers and ignores ``If-Range`` (answering
    206 with the new ETag): the cache must hold the new file whole, never old + new bytes."""
    size = 1024 * KiB
    old, new = make_payload(size, 6), make_payload(size, 7)
    switched = threading.Event()
    options = dataclasses.replace(FAST, chunk_size=128 * KiB, piece_size=32 * KiB)
    if parallel:
        options = dataclasses.replace(options, connections=4, split_below=float("inf"))
    else:
        options = dataclasses.replace(options, connections=1)
    cache = Cache(modelcache_home, read_only_paths=[], offline=False, transfer=options)

    def answer(request: Request) -> None:
        data, etag = (new, '"new"') if switched.is_set() else (old, '"old"')
        start, end = ranged(request, size) or (0, size)
        headers = {"Content-Length": str(end - start), "ETag": etag}
        if request.headers.get("range"):
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        request.head(206 if request.headers.get("range") else 200, headers)
        if request.number == 0:  # the first answer is cut short
            end = min(end, start + 100 * KiB)
        request.write(data[start:end])
        if request.number == 0:
            switched.set()
            request.hang_up()

    with HostileServer() as server:
        url = server.route("/swapped.bin", answer)
        got = cache.fetch(url)
        assert server.requests["/swapped.bin"] >= 2
    assert got.read_bytes() == new
    assert cache.verify() == []
