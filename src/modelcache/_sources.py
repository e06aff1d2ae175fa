"""Sources: parsing, normalising (for cache keys) and redacting (for anything shown) URLs."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

__all__ = [
    "HFLocation",
    "Source",
    "SourceLike",
    "parse_hf_url",
    "parse_sources",
    "redact",
]

SourceLike = Union[str, "os.PathLike[str]"]

_MASK = "***"
_SIGNING_PARAM = re.compile(
    r"^(x-amz-.*|x-goog-.*|signature|sig|se|st|sp|sv|sr|spr|skoid|sktid|skt|ske|sks|skv|"
    r"expires|policy|key-pair-id|token|access_token|auth|apikey|api_key|key|password|secret)$",
    re.IGNORECASE,
)
_SECRET_OPTION = re.compile(r"(secret|token|password|key|credential|session)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_URL_QUERY = re.compile(r"(?P<url>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]+)\?[^\s#'\"]*")
_LOCAL_PROTOCOLS = {"file", "local"}


def _is_url(text: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", text) is not None


@dataclass(frozen=True)
class Source:
    """One place a model can be read from.

    ``url`` keeps what the caller gave (credentials included) and is only used to open the
    source; everything shown to people goes through :attr:`redacted`.
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, value: SourceLike, storage_options: Mapping[str, Any] | None = None) -> Source:
        """Make a :class:`Source` from a path or URL; per-protocol options are picked out."""
        text = os.fspath(value)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"source must be a non-empty path or URL, got {value!r}")
        text = text.strip()
        if not _is_url(text):
            text = Path(text).expanduser().absolute().as_posix()
        source = cls(text)
        return cls(text, _options_for(source.protocol, storage_options or {}))

    @property
    def protocol(self) -> str:
        """``file``, ``http``, ``https``, ``s3``, ``gs``, ``hf``, ... (lowercase)."""
        if not _is_url(self.url):
            return "file"
        protocol = self.url.split("://", 1)[0].lower()
        return {"gcs": "gs", "s3a": "s3", "local": "file"}.get(protocol, protocol)

    @property
    def is_local(self) -> bool:
        """True for plain paths and ``file://`` URLs, which are used in place."""
        return self.protocol in _LOCAL_PROTOCOLS

    @property
    def local_path(self) -> Path:
        """The filesystem path of a local source."""
        if not _is_url(self.url):
            return Path(self.url)
        return Path(unquote(urlsplit(self.url).path))

    @property
    def is_directory(self) -> bool:
        """True when the source names a directory, prefix or whole repository."""
        if self.is_local:
            return self.local_path.is_dir()
        if self.protocol == "hf":
            return parse_hf_url(self.url).path == "" or self.url.endswith("/")
        return self.url.endswith("/")

    @property
    def name(self) -> str:
        """The file (or directory) name the cached copy keeps: loaders choose by its suffix."""
        if self.is_local:
            return self.local_path.name or "model"
        path = unquote(urlsplit(self.url).path).rstrip("/")
        if self.protocol == "oci":  # repository[:tag][@digest]: a one-layer entry is named by
            return path.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0] or "model"  # title
        if self.protocol == "hf" and "/" not in path.strip("/"):
            path = urlsplit(self.url).netloc + path
        name = path.rsplit("/", 1)[-1].split("@", 1)[0]
        return name or urlsplit(self.url).netloc or "model"

    @property
    def redacted(self) -> str:
        """The URL with user:password@ and query values masked: safe to log and show."""
        return redact(self.url)

    @property
    def normalized(self) -> str:
        """The URL as it identifies the content: no credentials, no signing parameters."""
        if self.is_local:
            return "file://" + quote(self.local_path.as_posix())
        parts = urlsplit(self.url)
        host = (parts.hostname or "").lower()
        port = parts.port
        default_port = {"http": 80, "https": 443}.get(self.protocol)
        netloc = host if port in (None, default_port) else f"{host}:{port}"
        query = sorted(
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not _SIGNING_PARAM.match(k)
        )
        path = parts.path or "/"
        if self.protocol == "oci":  # repository:tag@digest names what repository@digest does
            path = re.sub(r":[^/@]*(?=@sha256:)", "", path)
        return urlunsplit((self.protocol, netloc, path, urlencode(query), ""))

    @property
    def key(self) -> str:
        """The cache key used when no sha256 is given: a hash of :attr:`normalized`."""
        return hashlib.sha256(self.normalized.encode()).hexdigest()

    def secrets(self) -> list[str]:
        """Every secret string this source carries, to scrub from third-party messages."""
        found: list[str] = []
        if _is_url(self.url):
            parts = urlsplit(self.url)
            found += [s for s in (parts.password, parts.username) if s]
            found += [
                v
                for k, v in parse_qsl(parts.query)
                if len(v) >= 4 and k.lower() not in _SHOWN_PARAMS  # file patterns are shown
            ]
        for name, value in self.storage_options.items():
            if isinstance(value, str) and len(value) >= 4 and _SECRET_OPTION.search(name):
                found.append(value)
        return found

    def scrub(self, text: str) -> str:
        """``text`` with this source's secrets and any URL credentials masked."""
        for secret in sorted(set(self.secrets()), key=len, reverse=True):
            text = text.replace(secret, _MASK)
        return redact(text)

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"Source({self.redacted!r})"


def redact(text: str) -> str:
    """Mask credentials in every URL found in ``text`` (userinfo and query values)."""

    def mask_query(match: re.Match[str]) -> str:
        query = match.group(0).split("?", 1)[1]
        masked = "&".join(_mask_param(part) for part in query.split("&"))
        return f"{match.group('url')}?{masked}"

    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{_MASK}@", text)
    return _URL_QUERY.sub(mask_query, text)


# query parameters that select files (hf://owner/repo?include=...), never credentials
_SHOWN_PARAMS = {"include", "exclude"}


def _mask_param(part: str) -> str:
    name, equals, _ = part.partition("=")
    if not equals or name.lower() in _SHOWN_PARAMS:
        return part
    return f"{name}={_MASK}"


def _options_for(protocol: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Options for one protocol: keyed by protocol (``{"s3": {...}}``) or flat for all."""
    aliases = {protocol, {"gs": "gcs", "https": "http", "http": "https"}.get(protocol, protocol)}
    nested = [k for k, v in storage_options.items() if isinstance(v, Mapping)]
    known = {"s3", "gs", "gcs", "http", "https", "hf", "oci", "file", "az", "abfs"}
    if nested and set(nested) <= known:
        merged: dict[str, Any] = {}
        for name in nested:
            if name in aliases:
                merged.update(storage_options[name])
        return merged
    return dict(storage_options)


def parse_sources(
    source: SourceLike | Sequence[SourceLike],
    storage_options: Mapping[str, Any] | None = None,
) -> list[Source]:
    """One source or a list of mirrors (tried in order) as a non-empty list of :class:`Source`."""
    items: Iterable[SourceLike] = (
        [source] if isinstance(source, (str, os.PathLike)) else list(source)
    )
    sources = [Source.parse(item, storage_options) for item in items]
    if not sources:
        raise ValueError("source must name at least one path or URL")
    return sources


@dataclass(frozen=True)
class HFLocation:
    """The parts of ``hf://<owner>/<repo>[@<revision>][/<path>]``."""

    repo_id: str
    revision: str | None
    path: str


def parse_hf_url(url: str) -> HFLocation:
    """Split an ``hf://`` URL; a revision may follow the repo name after ``@``."""
    rest = url.split("://", 1)[1].strip("/")
    parts = rest.split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"expected hf://<owner>/<repo>[@<revision>][/<path>], got {redact(url)}")
    repo, _, revision = parts[1].partition("@")
    return HFLocation(f"{parts[0]}/{repo}", unquote(revision) or None, "/".join(parts[2:]))
