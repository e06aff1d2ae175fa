"""Readers: open byte ranges of one remote file, over HTTP(S) or any fsspec filesystem.

HTTP(S) goes through urllib3 directly rather than fsspec's aiohttp-based ``HTTPFileSystem``:
the engine needs several keep-alive connections issuing blocking ranged requests from worker
threads, which urllib3's thread-safe pool gives directly, and ``fsspec.get`` was slower than a
plain requests loop on 127.0.0.1 (``benchmarks/bench_fetch.py``).
Every other protocol (s3, gs, hf, ...) goes through fsspec.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import re
import select
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._retry import parse_retry_after, retryable_status
from ._sources import Source, redact
from ._transfer import FatalError, RangeStream, Reader, TransferOptions, TransientError
from ._version import __version__

__all__ = [
    "FsspecReader",
    "HTTPReader",
    "discard",
    "open_reader",
    "pool_for",
    "send",
    "status_error",
]

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
_pools: dict[tuple[str | None, float, float, int, str | None], Any] = {}
_pools_lock = threading.Lock()
#: what a redirect target (a signed URL) answers once it no longer serves the file
_EXPIRED = frozenset({401, 403, 404, 410})


def open_reader(source: Source, options: TransferOptions) -> Reader:
    """The reader for ``source``: HTTP(S) through urllib3, anything else through fsspec."""
    if source.protocol in ("http", "https"):
        return HTTPReader(source, options)
    from ._filesystems import open_filesystem

    fs, path = open_filesystem(source)
    return FsspecReader(fs, path)


_QUERY_VALUE = re.compile(r"(?P<name>[?&][^=&\s\"']+=)[^&\s\"'#]*")


def _mask_query(value: object) -> object:
    if isinstance(value, str) and "?" in value:
        return _QUERY_VALUE.sub(r"\g<name>***", redact(value))
    return value


class _RedactingFilter(logging.Filter):
    """Masks query values (signatures, tokens) in urllib3's request log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_mask_query(arg) for arg in record.args)
        record.msg = _mask_query(record.msg)
        return True


#: urllib3's loggers whose lines carry URLs: each request, each redirect's target (a signed CDN
#: URL), each retry (a filter on a logger does not see its children's records)
_URL_LOGGERS = ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry")


def _install_log_filter() -> None:
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactingFilter) for f in logger.filters):
            logger.addFilter(_RedactingFilter())


def pool_for(url: str, options: TransferOptions, ca_certs: str | None = None) -> Any:
    """The process's shared urllib3 pool for ``url``: the environment's proxy, keep-alive.

    ``ca_certs``: a CA bundle to trust instead of the system's (a private registry's CA).
    """
    return _pool(_proxy_for(url), options, ca_certs)


def _pool(proxy: str | None, options: TransferOptions, ca_certs: str | None = None) -> Any:
    import urllib3

    _install_log_filter()

    key = (proxy, options.connect_timeout, options.stall_timeout, options.connections, ca_certs)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            timeout = urllib3.Timeout(connect=options.connect_timeout, read=options.stall_timeout)
            retries = _redirect_policy()(
                total=None,
                connect=0,
                read=0,
                status=0,
                other=0,
                redirect=10,
                raise_on_redirect=True,
                raise_on_status=False,
            )
            kwargs: dict[str, Any] = {
                "maxsize": max(4, options.connections),
                "timeout": timeout,
                "retries": retries,
                "block": False,
            }
            if ca_certs is not None:
                kwargs["ca_certs"] = ca_certs
            pool = urllib3.ProxyManager(proxy, **kwargs) if proxy else urllib3.PoolManager(**kwargs)
            _pools[key] = pool
        return pool


_REDIRECT_LOOP = "too many redirects"
_DOWNGRADE = "refused a redirect from https to http"
_policy: Any = None


def _redirect_policy() -> Any:
    """urllib3's ``Retry`` that also refuses a redirect from https to plain http, as browsers
    do (the rest of a download, and any credentials, would travel in clear)."""
    global _policy
    if _policy is None:
        import urllib3
        from urllib3.exceptions import MaxRetryError, ResponseError

        class Redirects(urllib3.Retry):
            def increment(self, *args: Any, **kwargs: Any) -> Any:
                names = ("method", "url", "response", "error", "_pool")
                given = dict(zip(names, args, strict=False)) | kwargs
                url, response = given.get("url"), given.get("response")
                location = response.get_redirect_location() if response is not None else None
                if url and location:
                    target = urllib.parse.urljoin(url, location)
                    if urlsplit(url).scheme == "https" and urlsplit(target).scheme == "http":
                        refusal = ResponseError(f"{_DOWNGRADE} ({target})")
                        pool: Any = given.get("_pool")
                        raise MaxRetryError(pool, url, refusal)
                return super().increment(*args, **kwargs)

        _policy = Redirects
    return _policy


def _proxy_for(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class HTTPReader(Reader):
    """Ranged GETs with keep-alive connections shared by the process's worker threads."""

    def __init__(
        self, source: Source, options: TransferOptions, *, ca_certs: str | None = None
    ) -> None:
        parts = urlsplit(source.url)
        self._source = source
        self._headers: dict[str, str] = {
            "User-Agent": f"modelcache/{__version__}",
            "Accept-Encoding": "identity",
        }
        self._headers.update(_string_map(source.storage_options.get("headers")))
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        if parts.username is not None:
            from urllib.parse import unquote

            user = unquote(parts.username)
            password = unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers.setdefault("Authorization", f"Basic {token}")
        self._url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        self._options, self._ca_certs = options, ca_certs
        self._pool = pool_for(self._url, options, ca_certs)
        self._piece = options.piece_size
        #: where the origin redirected this file (a CDN's signed URL, and the pool and headers
        #: for it): later ranges go there at once, until it refuses one
        self._target: tuple[str, Any, dict[str, str]] | None = None
        self._refreshing = threading.Lock()
        #: the headers of the last response (stores read their metadata from them)
        self.last_headers: Mapping[str, str] = {}

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        ranged: dict[str, str] = {}
        if start or end is not None:
            ranged["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
            if etag and not etag.startswith("W/"):
                ranged["If-Range"] = etag
        target = self._target
        while target is not None:  # (a Hub file's chunks: no round trip to the Hub for each)
            url, pool, headers = target
            response = send(pool, "GET", url, headers=headers | ranged, scrub=self._source.scrub)
            if response.status not in _EXPIRED:
                return self._stream(response, start, bool(ranged))
            discard(response)  # its signature expired: the origin redirects afresh, once
            with self._refreshing:
                if self._target is target:  # (the others keep it until it is replaced)
                    return self._from_origin(start, ranged)
            target = self._target  # another worker asked the origin meanwhile
        return self._from_origin(start, ranged)

    def _from_origin(self, start: int, ranged: dict[str, str]) -> RangeStream:
        response = send(
            self._pool, "GET", self._url, headers=self._headers | ranged, scrub=self._source.scrub
        )
        self._follow(response.url)
        return self._stream(response, start, bool(ranged))

    def _follow(self, url: str | None) -> None:
        """Keep where a redirect led (or that none did), with the headers urllib3 sends there
        (no credentials to another host)."""
        if not url or url == self._url or urlsplit(url).scheme not in ("http", "https"):
            self._target = None
            return
        headers = dict(self._headers)
        if urlsplit(url).netloc != urlsplit(self._url).netloc:
            import urllib3

            dropped = {h.lower() for h in urllib3.Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT}
            headers = {k: v for k, v in headers.items() if k.lower() not in dropped}
        self._target = (url, pool_for(url, self._options, self._ca_certs), headers)

    def _describe(self, error: BaseException) -> str:
        return self._source.scrub(f"{type(error).__name__}: {error}")

    def _stream(self, response: Any, start: int, asked_range: bool) -> RangeStream:
        status = response.status
        self.last_headers = response.headers
        # the version's validator: the ETag, else Last-Modified (If-Range accepts both)
        etag = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match:
                discard(response)
                raise FatalError("the origin sent a partial answer without a Content-Range")
            size = None if match.group(3) == "*" else int(match.group(3))
            return RangeStream(
                self._pieces(response),
                int(match.group(1)),
                size,
                etag,
                True,
                close=lambda: discard(response),
                readinto=self._readinto(response),
                silent=lambda: _silent(response),
            )
        if status == 200:
            length = response.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            # the whole file, asked for: ranges may follow when the origin says it serves them
            accepts = response.headers.get("Accept-Ranges", "").strip().lower() == "bytes"
            return RangeStream(
                self._pieces(response),
                0,
                size,
                etag,
                accepts and not asked_range and size is not None,
                close=lambda: discard(response),
                readinto=self._readinto(response),
                silent=lambda: _silent(response),
            )
        if status == 416:
            match = _UNSATISFIED_RANGE.match(response.headers.get("Content-Range", ""))
            discard(response)
            if match and int(match.group(1)) == start:
                return RangeStream(iter(()), start, start, etag, True)
            raise TransientError("HTTP 416: the requested range is past the file's end")
        discard(response)
        raise status_error(status, response.headers)

    def _pieces(self, response: Any) -> Iterator[bytes]:
        import urllib3

        piece = self._piece
        try:
            while True:
                data = response.read(piece, decode_content=False)
                if not data:
                    return
                yield data
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise TransientError(self._describe(error)) from None

    def _readinto(self, response: Any) -> Callable[[memoryview], int] | None:
        """Read the body straight into the engine's buffers, skipping urllib3's copies.

        urllib3's ``read`` allocates and copies every piece; the ``http.client`` response it
        wraps reads into a caller's buffer with one ``recv_into``. That response is urllib3's
        (private) ``_fp``: used only when it is a plain ``http.client`` response and urllib3
        has nothing to decode, else the engine falls back to ``pieces``.
        """
        import urllib3

        raw = getattr(response, "_fp", None)
        if not isinstance(raw, http.client.HTTPResponse) or response.headers.get(
            "Content-Encoding", "identity"
        ) not in ("identity", ""):
            return None
        describe = self._describe
        steps = _ReadSizes()

        def readinto(buffer: memoryview) -> int:
            asked = steps.size(len(buffer))
            began = time.monotonic()
            try:
                got: int = raw.readinto(buffer[:asked])
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as error:
                raise TransientError(describe(error)) from None
            steps.took(asked, got, time.monotonic() - began)
            return got

        return readinto


class _ReadSizes:
    """How much one read of a body asks for, so that it returns soon on a slow stream.

    ``http.client`` reads through a buffered reader that returns only once the whole buffer is
    filled or the body ended: one 256 KiB read at 32 KiB/s would block for 8 s, and the
    progress, the hand-over of a partly filled buffer and a cancel would wait as long. Reads
    start at 16 KiB and double while they take less than half of :attr:`SECONDS`, so a stream
    faster than 2 MiB/s reads whole buffers after a few reads; one that took more than twice
    that shrinks to what the stream delivers in :attr:`SECONDS` (a moment short of CPU does
    not shrink a fast stream's reads for long: they double back).
    """

    FIRST = 16 * 1024
    LEAST = 8 * 1024  # the buffered reader's own buffer: smaller reads gain nothing
    SECONDS = 0.25  # how long one read should take at most (the stream's hand-over time)

    def __init__(self) -> None:
        self._size = self.FIRST

    def size(self, room: int) -> int:
        return min(room, self._size)

    def took(self, asked: int, got: int, seconds: float) -> None:
        if seconds > 2 * self.SECONDS:
            rate = got / seconds
            self._size = max(self.LEAST, int(rate * self.SECONDS) // self.LEAST * self.LEAST)
        elif got == asked and asked == self._size and seconds < self.SECONDS / 2:
            self._size *= 2


def send(
    pool: Any,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    body: bytes | None = None,
    stream: bool = True,
    scrub: Callable[[str], str] = redact,
) -> Any:
    """One request through ``pool``; urllib3's failures sorted into fatal and transient.

    ``stream``: leave the body unread (release it with :func:`discard`). Redirects are
    followed; urllib3 drops ``Authorization`` when one leads to another host.
    """
    import urllib3

    def shown(error: object) -> str:
        # urllib3 names the request in some messages as a bare path: its query (a signature)
        # is not behind a scheme that ``scrub`` would recognise
        return scrub(str(_mask_query(str(error))))

    try:
        return pool.request(
            method,
            url,
            headers=dict(headers),
            body=body,
            preload_content=not stream,
            decode_content=False,
        )
    except urllib3.exceptions.SSLError as error:
        raise FatalError(f"TLS error: {shown(error)}") from None
    except urllib3.exceptions.LocationValueError as error:
        raise FatalError(f"bad URL: {shown(error)}") from None
    except urllib3.exceptions.MaxRetryError as error:
        reason = error.reason if error.reason is not None else error
        if isinstance(reason, urllib3.exceptions.SSLError):
            raise FatalError(f"TLS error: {shown(reason)}") from None
        if isinstance(reason, urllib3.exceptions.ResponseError) and str(reason).startswith(
            _DOWNGRADE
        ):
            raise FatalError(shown(reason)) from None
        if isinstance(reason, urllib3.exceptions.ResponseError) and str(reason) == _REDIRECT_LOOP:
            raise FatalError("too many redirects (a redirect loop?)") from None
        raise TransientError(f"{type(reason).__name__}: {shown(reason)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise TransientError(f"{type(error).__name__}: {shown(error)}") from None


def status_error(status: int, headers: Mapping[str, str]) -> TransientError | FatalError:
    """The error an HTTP status means: the retryable ones are retried, the rest are not."""
    if retryable_status(status):
        return TransientError(f"HTTP {status}", parse_retry_after(headers.get("Retry-After")))
    if status in (401, 403):
        challenge = headers.get("WWW-Authenticate")
        return FatalError(
            f"refused (HTTP {status}): check the credentials", status, challenge=challenge
        )
    if status in (404, 410):
        return FatalError(f"not found (HTTP {status})", status)
    return FatalError(f"unexpected HTTP {status}", status)


def discard(response: Any) -> None:
    """Give the connection back when the body was read, else close it (never drain gigabytes).

    An unread body's socket is shut down first: a thread still blocked reading it (a cancelled
    download from a slow origin) wakes at once, where closing alone would wait for that read.
    """
    try:
        if not response.isclosed() and response.length_remaining != 0:  # None: chunked
            _shut_down(response)
            response.close()
    finally:
        response.release_conn()


def _socket(response: Any) -> Any:
    """The socket a urllib3 response is read from, while it holds its connection."""
    return getattr(getattr(response, "connection", None), "sock", None)


def _silent(response: Any) -> bool:
    """Whether no byte of ``response`` waits on its connection (the origin paused)."""
    sock = _socket(response)
    if sock is None:
        return False
    try:
        if getattr(sock, "pending", lambda: 0)():  # (TLS: bytes decrypted, not yet read)
            return False
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):  # (closed meanwhile)
        return False


def _shut_down(response: Any) -> None:
    sock = _socket(response)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


class FsspecReader(Reader):
    """Ranged reads through an fsspec filesystem's file objects (s3fs, gcsfs, hf, ...)."""

    def __init__(self, fs: Any, path: str, *, chunk_size: int | None = None) -> None:
        self._fs = fs
        self._path = path
        self.chunk_size = chunk_size
        self._info: dict[str, Any] | None = None

    def info(self) -> dict[str, Any]:
        """The filesystem's ``info()`` of the file, asked once."""
        if self._info is None:
            self._info = _call(self._fs.info, self._path)
        return self._info

    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        info = self.info()
        size = int(info["size"]) if info.get("size") is not None else None
        current = _etag_of(info)
        if etag is not None and current is not None and current != etag:
            start = 0
        stop = size if end is None else (end if size is None else min(end, size))
        return RangeStream(self._pieces(start, stop), start, size, current, True)

    def _pieces(self, start: int, stop: int | None) -> Iterator[bytes]:
        piece = 1 << 20
        position = start
        handle = _call(self._fs.open, self._path, "rb", block_size=piece, cache_type="none")
        try:
            _call(handle.seek, start)
            while stop is None or position < stop:
                want = piece if stop is None else min(piece, stop - position)
                data = _call(handle.read, want)
                if not data:
                    return
                position += len(data)
                yield data
        finally:
            with contextlib.suppress(Exception):  # closing a read-only handle loses no data
                handle.close()


def _etag_of(info: Mapping[str, Any]) -> str | None:
    for name in ("ETag", "etag", "md5Hash", "generation", "blob_id", "lfs_sha256"):
        value = info.get(name)
        if value:
            return str(value)
    return None


def _call(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a filesystem call, sorting its failures into fatal and transient."""
    from ._filesystems import classify  # the same rules as the S3, GCS and Hub readers

    try:
        return function(*args, **kwargs)
    except Exception as error:
        raise classify(error) from None
