"""S3 and GCS: what a source names (one object or every object under a prefix) and readers.

Both readers stream each byte range (never a whole object or range in memory):

- S3: s3fs signs a ``GetObject`` URL (its credentials, region and endpoint) and modelcache's HTTP
  reader (urllib3) reads it, straight into the engine's buffers: one copy less than botocore's
  streaming body, read through s3fs's event loop piece by piece (about 1.5x faster on moto).
  The response's ``ETag`` tells whether the object changed. Requests that need headers a
  signed URL cannot carry (requester pays, SSE-C keys in ``s3_additional_kwargs``) go through
  s3fs's botocore client instead, the body read in 1 MiB pieces (:class:`S3Reader`).
- GCS through gcsfs's endpoint and credentials, with the bytes read by modelcache's own HTTP
  reader (urllib3): gcsfs reads each range whole into memory.

Part sizes: S3 is probed like any HTTP origin, but its first GET asks for the whole object (a
GET is billed and answered after tens of milliseconds) and its first bytes measure the rate one
connection gets; at least ``TransferOptions.split_below``, it streams on to the end. Slower
(real S3 gives one connection roughly 50 to 100 MB/s): it is read on to two
:data:`S3_CHUNK`-s and cut there while the rest is fetched
as parallel ranged GETs, as many as still raise the total rate, at most
:data:`S3_CONNECTIONS`, and back to one stream when they prove no faster (moto, the local
server of the tests and benchmarks, copies the whole object for every ranged GET, so ranges are
slow there for a reason real S3 does not share). Each range is written where it belongs and
hashed back from the page cache, so memory is a buffer per connection;
``storage_options={"s3": {"connections": 1}}`` reads every object as one GET.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

from modelcache._filesystems import classify, open_filesystem, retrying, transfer_options
from modelcache._plan import Plan, RemoteFile, Selection
from modelcache._readers import FsspecReader, HTTPReader
from modelcache._sources import Source
from modelcache._transfer import FatalError, RangeStream, Reader, TransferOptions

__all__ = [
    "S3_CHUNK",
    "S3_CONNECTIONS",
    "GCSReader",
    "PresignedS3Reader",
    "S3Reader",
    "plan_store",
]

MiB = 1 << 20
#: bytes per ranged GET on S3 (see the module's docstring)
S3_CHUNK = 8 * MiB
#: ranged GETs at once per S3 object, at most
S3_CONNECTIONS = 8
_PIECE = 1 * MiB


def plan_store(source: Source, options: TransferOptions) -> Plan:
    """List what ``source`` names on an fsspec store: one file, or every file under a prefix."""
    fs, path = open_filesystem(source)
    scrub = source.scrub
    selection = Selection.from_source(source)
    base = source.url.split("?", 1)[0]
    directory = base.endswith("/")
    if source.protocol == "s3":
        shape = transfer_options(source, options, chunk_size=S3_CHUNK, connections=S3_CONNECTIONS)
    else:
        shape = transfer_options(source, options, chunk_size=None, connections=None)
    info: dict[str, Any] = {}
    if not directory:
        fs.invalidate_cache(path)
        info = retrying(lambda: fs.info(path), options, describe=lambda e: scrub(str(e)))
        directory = info.get("type") == "directory"
    if not directory:
        if selection:
            raise FatalError("include/exclude choose files of a directory; this is one file")
        entry = _remote_file(source, fs, path, "", info, shape)
        return Plan("file", [entry], _etag(info), {}, shape)
    root = path.rstrip("/")
    fs.invalidate_cache(root)
    listing = retrying(
        lambda: fs.find(root, detail=True), options, describe=lambda e: scrub(str(e))
    )
    files = []
    for name, item in sorted(listing.items()):
        if item.get("type") != "file" or name.endswith("/") or not name.startswith(root + "/"):
            continue
        relative = name[len(root) + 1 :]
        if selection.wants(relative):
            files.append(_remote_file(source, fs, name, relative, item, shape))
    if not files:
        raise FatalError(f"no files under this prefix{selection.describe()}", 404)
    return Plan("directory", files, None, {}, shape)


def _remote_file(
    source: Source,
    fs: Any,
    path: str,
    relative: str,
    info: dict[str, Any],
    options: TransferOptions,
) -> RemoteFile:
    size = info.get("size")
    declared = _declared_sha256(info)

    def open_reader(transfer: TransferOptions) -> Reader:
        if source.protocol == "s3" and PresignedS3Reader.suits(fs):
            return PresignedS3Reader(fs, path, transfer)
        if source.protocol == "s3":
            return S3Reader(
                fs, path, chunk_size=transfer.chunk_size, stall_timeout=transfer.stall_timeout
            )
        if source.protocol == "gs":
            return GCSReader(fs, path, info, transfer)
        return FsspecReader(fs, path, chunk_size=transfer.chunk_size)

    return RemoteFile(
        relative, int(size) if size is not None else None, open_reader, sha256=declared
    )


def _etag(info: dict[str, Any]) -> str | None:
    for name in ("ETag", "etag", "generation"):
        if info.get(name):
            return str(info[name])
    return None


def _declared_sha256(info: dict[str, Any]) -> str | None:
    """The sha256 kept in the object's metadata (``modelcache mirror`` writes it)."""
    metadata = info.get("metadata") or info.get("Metadata") or {}
    value = metadata.get("sha256") if isinstance(metadata, dict) else None
    if isinstance(value, str) and len(value) == 64:
        return value.lower()
    return None


class PresignedS3Reader(Reader):
    """Ranged GETs of a ``GetObject`` URL that s3fs signs, read by modelcache's HTTP reader."""

    first_request_to_end = True  # a GET costs more than a cut one's bytes in flight

    #: how long each signed URL stays valid (a fresh one is signed for every request)
    EXPIRES = 3600

    def __init__(self, fs: Any, path: str, options: TransferOptions) -> None:
        self._fs = fs
        self._path = path
        self._options = options
        self.chunk_size = options.chunk_size
        self.declared_sha256: str | None = None

    @staticmethod
    def suits(fs: Any) -> bool:
        """Whether a signed URL carries every request option ``fs`` would send."""
        return not getattr(fs, "req_kw", None) and not getattr(fs, "s3_additional_kwargs", None)

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        try:
            url = self._fs.url(self._path, expires=self.EXPIRES)
        except Exception as error:
            raise classify(error) from None
        stream, headers = _open_http(url, {}, self._options, start, end, etag)
        declared = {"Metadata": {"sha256": headers.get("x-amz-meta-sha256")}}
        self.declared_sha256 = _declared_sha256(declared)
        return stream


class S3Reader(Reader):
    """Ranged ``GetObject`` calls through s3fs's client, each body streamed in 1 MiB pieces."""

    first_request_to_end = True  # a GET costs more than a cut one's bytes in flight

    def __init__(
        self, fs: Any, path: str, *, chunk_size: int | None = None, stall_timeout: float = 30.0
    ) -> None:
        self._fs = fs
        bucket, key, version = fs.split_path(path)
        self._target: dict[str, str] = {"Bucket": bucket, "Key": key}
        if version:
            self._target["VersionId"] = version
        self.chunk_size = chunk_size
        self._stall = stall_timeout
        self.declared_sha256: str | None = None

    def _call(self, method: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        try:
            return sync(
                self._fs.loop,
                self._fs._call_s3,
                method,
                **self._target,
                **kwargs,
                timeout=self._stall * 2,
            )
        except Exception as error:
            raise classify(error) from None

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        # No HEAD and no IfMatch: the response's own ETag tells the engine whether the object
        # is still the one it started with (it starts again from byte 0 when not), and each
        # costs a request, or on moto a pass over the whole object.
        request: dict[str, Any] = {}
        if start or end is not None:
            request["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = self._call("get_object", **request)
        except FatalError as error:
            if start and (error.status == 416 or "InvalidRange" in str(error)):
                return self.open(0, end, None)  # the object shrank: it changed, start again
            raise
        size, first = _extent(response, start)
        metadata = {"Metadata": response.get("Metadata") or {}}
        self.declared_sha256 = _declared_sha256(metadata)
        body = response["Body"]
        length = int(response.get("ContentLength") or 0)
        return RangeStream(
            self._pieces(body, length),
            first,
            size,
            response.get("ETag"),
            True,
            close=lambda: self._close(body),
        )

    def _pieces(self, body: Any, length: int) -> Iterator[bytes]:
        from fsspec.asyn import sync

        left = length
        while left > 0:
            try:
                data = sync(self._fs.loop, _read, body, min(_PIECE, left), timeout=self._stall)
            except Exception as error:
                raise classify(error) from None
            if not data:
                return
            left -= len(data)
            yield data

    def _close(self, body: Any) -> None:
        from fsspec.asyn import sync

        with contextlib.suppress(Exception):  # closing a read stream cannot lose data
            sync(self._fs.loop, _aclose, body, timeout=5)


def _extent(response: dict[str, Any], start: int) -> tuple[int | None, int]:
    """``(object size, first byte)`` of a ``GetObject`` answer."""
    content_range = str(response.get("ContentRange") or "")
    if content_range.startswith("bytes ") and "/" in content_range:
        span, _, total = content_range[len("bytes ") :].partition("/")
        first = int(span.split("-")[0]) if span[:1].isdigit() else start
        return (int(total) if total.isdigit() else None), first
    return int(response.get("ContentLength") or 0), 0


async def _read(body: Any, size: int) -> bytes:
    parts = []
    got = 0
    while got < size:
        data = await body.read(size - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def _aclose(body: Any) -> None:
    body.close()


class GCSReader(Reader):
    """Ranged GETs of a GCS object's media URL (generation pinned) with gcsfs's credentials."""

    def __init__(self, fs: Any, path: str, info: dict[str, Any], options: TransferOptions) -> None:
        self._fs = fs
        self._path = path
        self._generation = info.get("generation")
        self._options = options
        self.chunk_size = options.chunk_size
        metadata = info.get("metadata")
        self.declared_sha256 = _declared_sha256({"metadata": metadata or {}})

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        fs = self._fs
        try:
            url = fs.url(self._path, generation=self._generation)
            params = fs._get_params({})
            headers = fs._get_headers(None)  # fresh credentials for every request
        except Exception as error:
            raise classify(error) from None
        if params:
            url += "&" + urlencode(params)
        return _open_http(url, headers, self._options, start, end, etag)[0]


def _open_http(
    url: str,
    headers: dict[str, str],
    options: TransferOptions,
    start: int,
    end: int | None,
    etag: str | None,
) -> tuple[RangeStream, Mapping[str, str]]:
    """One ranged GET of a URL freshly signed or authorised; the stream and its headers."""
    reader = HTTPReader(Source(url, {"headers": headers}), options)
    try:
        return reader.open(start, end, etag), reader.last_headers
    finally:
        reader.close()
