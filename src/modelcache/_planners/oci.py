"""OCI registries: ``oci://<registry>/<repository>[:<tag>|@sha256:<digest>]``.

The registry answers the questions (a tag's digest, the manifest, an index's first manifest,
each titled layer's size and digest) through :mod:`modelcache._oci`; the bytes come through
ranged blob GETs, each layer checked against its digest (the sha256 of its bytes), so a layer
already stored as a blob (another source brought it) is not fetched.

Tags: a cache entry is keyed by the URL, so a digest-pinned source (or any URL already cached)
starts warm with no request. A tag is resolved once, when the entry is made; the digest it
named is recorded in the entry's ``meta.json`` (``"oci"``) and kept until the entry is fetched
again with ``refresh=True``. Offline, the recorded entry is used.
"""

from __future__ import annotations

from collections.abc import Callable

from modelcache._filesystems import transfer_options
from modelcache._oci import BlobReader, DigestError, Layer, RegistryClient, parse_reference
from modelcache._plan import Plan, RemoteFile
from modelcache._sources import Source
from modelcache._transfer import FatalError, RangeStream, Reader, TransferOptions
from modelcache.errors import IntegrityError

__all__ = ["plan_oci"]


def plan_oci(source: Source, options: TransferOptions) -> Plan:
    """Ask the registry what ``source`` names: the manifest's digest and its titled layers.

    Raises :class:`FatalError` (refused, not found, not an artifact of files; credentials and
    tokens masked) or :class:`IntegrityError` (a manifest that is not the digest it is named by).
    """
    try:
        reference = parse_reference(source.url)
    except ValueError as error:
        raise FatalError(f"bad URL: {error}") from None
    shape = transfer_options(source, options, chunk_size=None, connections=None)
    client = RegistryClient(reference.registry, source.storage_options, transfer=shape)
    try:
        artifact = client.artifact(reference)
        files = [
            RemoteFile(path, layer.size, _opener(client, reference.repository, layer), layer.sha256)
            for path, layer in artifact.files()
        ]
    except DigestError as error:
        raise IntegrityError(client.scrub(str(error))) from None
    except FatalError as error:
        raise FatalError(client.scrub(str(error)), error.status) from None
    return Plan(artifact.kind, files, artifact.pinned, artifact.meta, shape, name=artifact.name)


def _opener(
    client: RegistryClient, repository: str, layer: Layer
) -> Callable[[TransferOptions], Reader]:
    def open_reader(transfer: TransferOptions) -> Reader:
        return _LayerReader(client.blob_reader(repository, layer, transfer))

    return open_reader


class _LayerReader(Reader):
    """A layer's :class:`BlobReader`, its digest errors raised as :class:`IntegrityError`."""

    def __init__(self, blob: BlobReader) -> None:
        self._blob = blob
        self.chunk_size = blob.chunk_size
        #: the sha256 the bytes must have (the layer's digest)
        self.declared_sha256 = blob.declared_sha256

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        try:
            return self._blob.open(start, end, etag)
        except DigestError as error:
            raise IntegrityError(str(error)) from None

    def close(self) -> None:
        self._blob.close()
