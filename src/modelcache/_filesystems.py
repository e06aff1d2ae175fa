"""fsspec filesystems for object stores, imported only when a source needs one.

Also the two things every store shares: sorting a client library's failures into retryable and
not (:func:`classify`), and the options that belong to modelcache rather than to the client:

- ``include`` / ``exclude`` query parameters of a directory source choose files by pattern
  (``hf://org/repo?include=config.json,model.bin``);
- ``connections`` / ``chunk_size`` in a protocol's ``storage_options`` shape its transfers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._retry import call_with_retries, parse_retry_after, retryable_status
from ._sources import Source
from ._transfer import FatalError, TransferOptions, TransientError

__all__ = [
    "EXTRAS",
    "SELECTION_PARAMS",
    "TRANSFER_KEYS",
    "classify",
    "client_options",
    "fsspec_url",
    "open_filesystem",
    "require_extra",
    "retrying",
    "transfer_options",
]

T = TypeVar("T")

#: protocol -> (module that implements it, the modelcache extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", "hf"),
}

#: query parameters of a source URL that select files; never sent to the store
SELECTION_PARAMS = ("include", "exclude")

#: keys of ``storage_options`` that shape modelcache's transfers; never sent to the store
TRANSFER_KEYS = ("connections", "chunk_size")

_RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
#: parts of exception class names that mean a connection broke (aiohttp, botocore, httpx, ...)
_TRANSIENT_NAMES = (
    "Connect",
    "Timeout",
    "Closed",
    "Disconnect",
    "Payload",
    "Protocol",
    "Network",
    "Incomplete",
    "Streaming",
    "ReadError",
)


def require_extra(protocol: str) -> None:
    """Raise a clear error naming the exact install command when a backend is missing."""
    module, extra = EXTRAS.get(protocol, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise FatalError(
            f"reading {protocol}:// sources needs {module}: pip install 'modelcache[{extra}]'"
        )


def fsspec_url(source: Source) -> str:
    """The source's URL without modelcache's own query parameters."""
    parts = urlsplit(source.url)
    if not parts.query:
        return source.url
    kept = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in SELECTION_PARAMS
    ]
    return urlunsplit(parts._replace(query=urlencode(kept)))


def client_options(source: Source) -> dict[str, Any]:
    """``storage_options`` for the client library: modelcache's keys removed, defaults added.

    botocore does not retry S3 requests (one attempt each, unless ``config_kwargs`` says
    otherwise): modelcache's transfer engine retries them, resuming where the bytes stopped,
    within ``TransferOptions``' budget, instead of two layers of retries multiplying.
    """
    options = {k: v for k, v in source.storage_options.items() if k not in TRANSFER_KEYS}
    if source.protocol == "s3":
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config
    return options


def transfer_options(
    source: Source, base: TransferOptions, *, chunk_size: int | None, connections: int | None
) -> TransferOptions:
    """``base`` shaped for one store: its defaults, then the source's own ``storage_options``."""
    shape: dict[str, int] = {}
    if chunk_size is not None:
        shape["chunk_size"] = chunk_size
    if connections is not None:
        shape["connections"] = min(base.connections, connections)
    for name in TRANSFER_KEYS:
        value = source.storage_options.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FatalError(f"storage option {name!r} must be a positive integer")
            shape[name] = value
    return dataclasses.replace(base, **shape)


def open_filesystem(source: Source) -> tuple[Any, str]:
    """The fsspec filesystem and path for ``source`` (credentials from ``storage_options``)."""
    require_extra(source.protocol)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(fsspec_url(source), **client_options(source))
    except ValueError as error:
        if "Protocol not known" in str(error):
            raise FatalError(f"unknown scheme {source.protocol!r}") from None
        raise FatalError(f"bad URL: {source.scrub(str(error))}") from None
    except TypeError as error:
        raise FatalError(f"bad storage_options: {source.scrub(str(error))}") from None
    except ImportError as error:
        raise FatalError(f"cannot read {source.protocol}:// sources: {error}") from None
    return fs, path


# -- failures ---------------------------------------------------------------------------------


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _status(error: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and store error code carried by a client library's exception."""
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):  # botocore ClientError
        meta = response.get("ResponseMetadata") or {}
        code = (response.get("Error") or {}).get("Code")
        status = meta.get("HTTPStatusCode")
        if status is None and isinstance(code, str) and code.isdigit():
            status = int(code)
        return (int(status) if status else None), code
    status = getattr(response, "status_code", None)  # httpx (huggingface_hub)
    if isinstance(status, int):
        return status, None
    if any(n in ("ClientResponseError", "HttpError") for n in _names(error)):
        for name in ("status", "code"):  # aiohttp ClientResponseError, gcsfs HttpError
            value = getattr(error, name, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value, None
    return None, None


def _retry_after(error: BaseException) -> float | None:
    """The seconds a ``Retry-After`` header of the error's response asks to wait, if any."""
    response = getattr(error, "response", None)
    if isinstance(response, Mapping):  # botocore: lowercased header names
        headers = (response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}
    else:
        headers = getattr(response, "headers", None) or {}
    try:
        return parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))
    except AttributeError:  # not a mapping of headers
        return None


def _names(error: BaseException) -> list[str]:
    return [cls.__name__ for cls in type(error).__mro__]


def classify(error: BaseException) -> FatalError | TransientError:
    """Sort a store's failure: retryable (:class:`TransientError`) or not (:class:`FatalError`)."""
    if isinstance(error, (FatalError, TransientError)):
        return error
    described = f"{type(error).__name__}: {error}".strip().rstrip(":")
    chain = _chain(error)
    names = {type(item).__name__ for item in chain}
    if any(marker in name for name in names for marker in _TRANSIENT_NAMES):
        return TransientError(described)  # a connection broke, whatever status it mentions
    for item in chain:
        status, code = _status(item)
        if status is None and code is None:
            continue
        if status in (404, 410) or code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
            return FatalError(f"not found ({code or f'HTTP {status}'})", 404)
        if status in (401, 403) or code in (
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "ExpiredToken",
        ):
            return FatalError(
                f"refused ({code or f'HTTP {status}'}): check the credentials", status or 403
            )
        if code in _RETRY_CODES or (status is not None and retryable_status(status)):
            return TransientError(f"HTTP {status} {code or ''}".strip(), _retry_after(item))
        return FatalError(f"{code or f'HTTP {status}'}: {described}", status)
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return FatalError(f"no credentials: {described}", 401)
    if isinstance(error, FileNotFoundError):
        return FatalError(f"not found: {error}", 404)
    if isinstance(error, PermissionError):
        return FatalError(f"refused: {error}", 403)
    if isinstance(error, (ValueError, TypeError, NotImplementedError, KeyError)):
        return FatalError(described)
    if isinstance(error, (OSError, asyncio.TimeoutError, TimeoutError)):
        return TransientError(described)
    return FatalError(described)


def retrying(
    call: Callable[[], T],
    options: TransferOptions,
    *,
    describe: Callable[[BaseException], str] = str,
) -> T:
    """Run a metadata call (a listing, a HEAD), retrying transient failures like the engine.

    Raises :class:`FatalError` when the failure is permanent or the retries are spent.
    """
    return call_with_retries(call, options, classify=classify, describe=describe)
