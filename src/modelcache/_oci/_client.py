"""A small client of the distribution API (OCI registries): manifests, blobs, uploads.

It speaks through the process's shared urllib3 pool (``readers.pool_for``: proxies from the
environment, keep-alive, a private CA when given), answers authentication challenges through
:class:`~._auth.Authenticator`, and sorts failures the way every reader does
(``readers.status_error``: ``_retry``'s retryable statuses are :class:`TransientError`, retried by
``filesystems.retrying`` for requests and by the transfer engine for blob bytes).

Options (``storage_options={"oci": {...}}``): ``username`` / ``password``; ``plain_http``
(``True``: http, ``False``: https; default: http for a loopback registry only); ``ca_file``
(a PEM bundle to trust, for a registry with a private CA; implies https);
``upload_chunk_size`` (bytes per PATCH when pushing a large blob). ``connections`` /
``chunk_size`` shape downloads as for any source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from modelcache._filesystems import TRANSFER_KEYS, retrying
from modelcache._readers import HTTPReader, discard, pool_for, send, status_error
from modelcache._sources import Source
from modelcache._transfer import FatalError, RangeStream, Reader, TransferOptions
from modelcache._version import __version__

from ._auth import Authenticator, credentials_for, pull_scope, push_scope
from ._manifest import (
    INDEXES,
    MANIFEST_TYPES,
    Artifact,
    DigestError,
    Layer,
    Manifest,
    titled_layers,
)
from ._reference import Reference, api_host, is_loopback

__all__ = ["BlobReader", "RegistryClient", "RegistryOptions"]

log = logging.getLogger("modelcache")
T = TypeVar("T")

_MAX_MANIFEST = 4 << 20  # the distribution spec's limit registries must accept
_UPLOAD_CHUNK = 16 << 20
_OPTION_KEYS = {"username", "password", "plain_http", "ca_file", "upload_chunk_size"}


@dataclass(frozen=True)
class RegistryOptions:
    """The ``oci`` storage options, checked."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    plain_http: bool | None = None
    ca_file: str | None = None
    upload_chunk_size: int = _UPLOAD_CHUNK

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> RegistryOptions:
        """Read ``storage_options`` (the ``oci`` ones, or flat); unknown keys are an error."""
        options = dict(options or {})
        if isinstance(options.get("oci"), Mapping):
            options = dict(options["oci"])
        unknown = sorted(set(options) - _OPTION_KEYS - set(TRANSFER_KEYS))
        if unknown:
            raise FatalError(
                f"unknown oci storage option(s) {', '.join(unknown)}; known: "
                f"{', '.join(sorted(_OPTION_KEYS | set(TRANSFER_KEYS)))}"
            )
        plain = options.get("plain_http")
        if plain is not None and not isinstance(plain, bool):
            raise FatalError("storage option 'plain_http' must be True or False")
        ca_file = options.get("ca_file")
        if ca_file is not None and not Path(str(ca_file)).is_file():
            raise FatalError(f"storage option 'ca_file': no file at {ca_file}")
        chunk = options.get("upload_chunk_size", _UPLOAD_CHUNK)
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise FatalError("storage option 'upload_chunk_size' must be a positive integer")
        return cls(
            options.get("username"),
            options.get("password"),
            plain,
            None if ca_file is None else str(ca_file),
            chunk,
        )


class RegistryClient:
    """Talks to one registry (``host[:port]``) for any of its repositories."""

    def __init__(
        self,
        registry: str,
        options: Mapping[str, Any] | None = None,
        *,
        transfer: TransferOptions | None = None,
    ) -> None:
        self.registry = registry
        self.options = RegistryOptions.from_mapping(options)
        self.transfer = transfer or TransferOptions()
        plain = self.options.plain_http
        if plain is None:  # a CA to trust means TLS; else loopback registries speak http
            plain = self.options.ca_file is None and is_loopback(registry)
        self.scheme = "http" if plain else "https"
        self.base = f"{self.scheme}://{api_host(registry)}"
        self._pool = pool_for(self.base, self.transfer, self.options.ca_file)
        credentials = credentials_for(
            registry, {"username": self.options.username, "password": self.options.password}
        )
        self._auth = Authenticator(registry, credentials, self._plain_send)

    # -- plumbing -------------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """``text`` with every credential and token of this registry masked."""
        return self._auth.scrub(text)

    def _url(self, repository: str, *path: str) -> str:
        return f"{self.base}/v2/{repository}/" + "/".join(quote(p, safe=":@") for p in path)

    def _plain_send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        response = send(
            self._pool,
            method,
            url,
            headers=self._headers(headers),
            body=body,
            stream=False,
            scrub=self.scrub,
        )
        return response.status, response.headers, response.data

    def _headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        return {"User-Agent": f"modelcache/{__version__}", "Accept-Encoding": "identity", **extra}

    def _same_host(self, url: str) -> bool:
        return urlsplit(url).netloc.lower() == urlsplit(self.base).netloc.lower()

    def _request(
        self,
        method: str,
        url: str,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> Any:
        """One request (its body read) with this registry's Authorization for ``scope``.

        A 401 is answered once (a token for the scope, or Basic); a second one is a refusal.
        """
        for attempt in range(2):
            sent = self._auth.header(scope) if self._same_host(url) else None
            request_headers = self._headers(headers or {})
            if sent is not None:
                request_headers["Authorization"] = sent
            response = send(
                self._pool,
                method,
                url,
                headers=request_headers,
                body=body,
                stream=False,
                scrub=self.scrub,
            )
            if response.status != 401:
                return response
            challenge = response.headers.get("WWW-Authenticate")
            discard(response)
            if attempt == 0 and self._auth.answer(challenge, scope, sent):
                continue
            raise FatalError(self._auth.refusal(), 401)
        raise AssertionError("unreachable")

    def _fail(self, response: Any, what: str) -> Exception:
        """The error for an unexpected answer, with the registry's own error code and message."""
        error = status_error(response.status, response.headers)
        detail = _registry_errors(response)
        reason = f"{what}: {error}{f' ({detail})' if detail else ''}"
        error.args = (self.scrub(reason),)  # keeps the status or Retry-After it carries
        return error

    def _retrying(self, call: Callable[[], T]) -> T:
        return retrying(call, self.transfer, describe=lambda e: self.scrub(str(e)))

    # -- reading --------------------------------------------------------------------------------

    def resolve(self, reference: Reference) -> str:
        """The digest ``reference`` names now: its own digest, else what its tag points at."""
        if reference.digest is not None:
            return reference.digest
        url = self._url(reference.repository, "manifests", reference.manifest_reference)
        scope = pull_scope(reference.repository)

        def head() -> str | None:
            response = self._request("HEAD", url, scope, headers={"Accept": _ACCEPT})
            if response.status != 200:
                raise self._fail(response, f"tag {reference.tag!r} of {reference.repository}")
            said = response.headers.get("Docker-Content-Digest")
            return None if said is None else str(said)

        digest = self._retrying(head)
        if digest is None or not digest.startswith("sha256:"):
            digest = self.manifest(reference.repository, reference.manifest_reference).digest
        log.debug("oci: %s resolved to %s", reference.url(selection=False), digest)
        return digest

    def manifest(self, repository: str, reference: str) -> Manifest:
        """The manifest named by a tag or digest; one named by a digest is checked against it."""
        url = self._url(repository, "manifests", reference)
        scope = pull_scope(repository)

        def get() -> Any:
            response = self._request("GET", url, scope, headers={"Accept": _ACCEPT})
            if response.status != 200:
                raise self._fail(response, f"manifest {reference} of {repository}")
            return response

        response = self._retrying(get)
        raw = response.data
        if len(raw) > _MAX_MANIFEST:
            raise FatalError(f"the manifest {reference} of {repository} is over 4 MiB")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        expected = reference if reference.startswith("sha256:") else None
        expected = expected or response.headers.get("Docker-Content-Digest")
        if expected is not None and expected.startswith("sha256:") and expected != digest:
            raise DigestError(
                f"the manifest {reference} of {repository} the registry sent has digest "
                f"{digest}, not {expected}"
            )
        try:
            document = json.loads(raw)
        except ValueError:
            raise FatalError(f"the manifest {reference} of {repository} is not JSON") from None
        if not isinstance(document, Mapping):
            raise FatalError(f"the manifest {reference} of {repository} is not a JSON object")
        media_type = str(
            document.get("mediaType") or response.headers.get("Content-Type", "").split(";")[0]
        )
        return Manifest(digest, media_type, raw, document)

    def artifact(self, reference: Reference) -> Artifact:
        """Resolve ``reference`` to its manifest (an index's first) and list its titled layers."""
        top = self.manifest(reference.repository, reference.manifest_reference)
        manifest = top
        if top.media_type in INDEXES or "manifests" in top.document:
            entries = top.document.get("manifests") or []
            if not entries or not isinstance(entries[0], Mapping):
                raise FatalError(f"the index {top.digest} of {reference.repository} is empty")
            manifest = self.manifest(reference.repository, str(entries[0].get("digest")))
        layers = titled_layers(manifest, reference)
        document = manifest.document
        config = document.get("config")
        artifact_type = document.get("artifactType") or (
            config.get("mediaType") if isinstance(config, Mapping) else None
        )
        return Artifact(
            reference.at(top.digest),
            top.digest,
            manifest.digest,
            manifest.media_type,
            None if artifact_type is None else str(artifact_type),
            layers,
        )

    def blob_reader(self, repository: str, layer: Layer, transfer: TransferOptions) -> BlobReader:
        """A :class:`~modelcache._transfer.Reader` of one layer, for the transfer engine."""
        return BlobReader(self, repository, layer, transfer)

    # -- writing --------------------------------------------------------------------------------

    def blob_size(self, repository: str, digest: str) -> int | None:
        """The size of a blob the repository has, or ``None`` when it has not."""
        url = self._url(repository, "blobs", digest)

        def head() -> int | None:
            response = self._request("HEAD", url, push_scope(repository))
            if response.status == 404:
                return None
            if response.status != 200:
                raise self._fail(response, f"blob {digest} of {repository}")
            length = response.headers.get("Content-Length", "")
            return int(length) if length.isdigit() else -1

        return self._retrying(head)

    def upload_blob(
        self,
        repository: str,
        open_bytes: Callable[[], Any],
        digest: str,
        size: int,
        *,
        mount_from: str | None = None,
    ) -> str:
        """Upload one blob; ``"uploaded"`` or ``"mounted"`` (taken from ``mount_from``).

        ``open_bytes()`` opens the content as a binary file. Blobs up to
        ``upload_chunk_size`` go up in one PUT, larger ones as PATCH chunks. A transient
        failure starts a new upload session (within the usual retry budget).
        """
        return self._retrying(
            lambda: self._upload(repository, open_bytes, digest, size, mount_from)
        )

    def _upload(
        self,
        repository: str,
        open_bytes: Callable[[], Any],
        digest: str,
        size: int,
        mount_from: str | None,
    ) -> str:
        scope = push_scope(repository)
        if mount_from is not None:
            scope = f"{scope} {pull_scope(mount_from)}"
        url = self._url(repository, "blobs", "uploads") + "/"
        if mount_from is not None:
            url += f"?mount={quote(digest, safe=':')}&from={quote(mount_from, safe='/')}"
        response = self._request("POST", url, scope, headers={"Content-Length": "0"}, body=b"")
        if response.status == 201 and mount_from is not None:
            return "mounted"
        if response.status != 202:
            raise self._fail(response, f"starting an upload to {repository}")
        location = self._location(response, url)
        chunk = self.options.upload_chunk_size
        with open_bytes() as handle:
            if size <= chunk:
                return self._finish(repository, location, scope, digest, handle.read(size))
            offset = 0
            while offset < size:
                data = handle.read(min(chunk, size - offset))
                if not data:
                    raise FatalError(f"the file of blob {digest} shrank while it was uploaded")
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Range": f"{offset}-{offset + len(data) - 1}",
                }
                response = self._request("PATCH", location, scope, headers=headers, body=data)
                if response.status != 202:
                    raise self._fail(response, f"uploading a chunk of {digest} to {repository}")
                location = self._location(response, location)
                offset += len(data)
                log.debug("oci: uploaded %d of %d bytes of %s", offset, size, digest)
        return self._finish(repository, location, scope, digest, b"")

    def _finish(self, repository: str, location: str, scope: str, digest: str, data: bytes) -> str:
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}digest={quote(digest, safe=':')}"
        headers = {"Content-Type": "application/octet-stream"}
        response = self._request("PUT", url, scope, headers=headers, body=data)
        if response.status != 201:
            raise self._fail(response, f"finishing the upload of {digest} to {repository}")
        return "uploaded"

    def _location(self, response: Any, base: str) -> str:
        location = str(response.headers.get("Location") or "")
        if not location:
            raise FatalError(f"{self.registry} answered an upload without a Location")
        return urljoin(base, location)

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """Store a manifest under a tag (or its digest); returns its digest."""
        url = self._url(repository, "manifests", reference)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()

        def put() -> str:
            response = self._request(
                "PUT", url, push_scope(repository), headers={"Content-Type": media_type}, body=raw
            )
            if response.status not in (200, 201):
                raise self._fail(response, f"storing the manifest {reference} in {repository}")
            said = response.headers.get("Docker-Content-Digest")
            if said is not None and said != digest:
                raise DigestError(f"{self.registry} stored the manifest as {said}, not {digest}")
            return digest

        return self._retrying(put)


_ACCEPT = ", ".join(MANIFEST_TYPES)


def _registry_errors(response: Any) -> str:
    """``CODE: message`` of the distribution API's error body, if it has one."""
    try:
        document = json.loads(response.data or b"{}")
        errors = document.get("errors") or []
        return "; ".join(
            f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, Mapping)
        )
    except (ValueError, AttributeError, TypeError):
        return ""


class BlobReader(Reader):
    """Ranged GETs of one blob (``Reader`` of the transfer engine).

    Each answer's size is checked against the layer's while it streams; the engine hashes the
    bytes and :attr:`declared_sha256` (the digest) is what they must hash to. A 401 (an
    expired token) is answered and the range asked again; redirects to blob storage are
    followed without the registry's Authorization when they lead to another host.
    """

    def __init__(
        self, client: RegistryClient, repository: str, layer: Layer, transfer: TransferOptions
    ) -> None:
        self._client = client
        self._repository = repository
        self._layer = layer
        self._transfer = transfer
        self._url = client._url(repository, "blobs", layer.digest)
        #: the sha256 the bytes must have (checked by whoever runs the transfer)
        self.declared_sha256 = layer.sha256
        #: the HTTP reader the workers share, and the Authorization it sends: it keeps where
        #: the registry redirected the blob (blob storage's signed URL) for the later chunks
        self._http: tuple[str | None, HTTPReader] | None = None
        self._lock = threading.Lock()

    def _reader(self, sent: str | None) -> HTTPReader:
        """The shared reader, made again when the Authorization changed (a new token)."""
        with self._lock:
            if self._http is None or self._http[0] != sent:
                headers = {"Authorization": sent} if sent is not None else {}
                source = Source(self._url, {"headers": headers})
                reader = HTTPReader(source, self._transfer, ca_certs=self._client.options.ca_file)
                self._http = (sent, reader)
            return self._http[1]

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        client = self._client
        scope = pull_scope(self._repository)
        for attempt in range(2):
            sent = client._auth.header(scope)
            try:
                stream = self._reader(sent).open(start, end, etag)
            except FatalError as error:
                if error.status == 401 and attempt == 0:
                    if client._auth.answer(error.challenge, scope, sent):
                        continue
                    raise FatalError(client._auth.refusal(), 401) from None
                raise type(error)(
                    client.scrub(f"{self._layer.title}: {error}"), error.status
                ) from None
            if stream.size is not None and stream.size != self._layer.size:
                stream.close()
                raise DigestError(
                    f"{self._layer.title}: the registry serves {stream.size} bytes for a layer "
                    f"of {self._layer.size}"
                )
            return stream
        raise AssertionError("unreachable")
