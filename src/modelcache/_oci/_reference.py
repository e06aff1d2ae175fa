"""``oci://<registry>[:<port>]/<repository>[:<tag>|@sha256:<digest>][?include=...&exclude=...]``.

The grammar is the distribution spec's (and ``docker``'s): a repository is lowercase components
separated by ``/``; a tag is up to 128 of ``[A-Za-z0-9_.-]``, not starting with ``.`` or ``-``;
a digest pins the manifest (``name:tag@digest`` is accepted, the digest wins). Without either,
the tag is ``latest``. Docker Hub is ``docker.io`` (its API answers at ``registry-1.docker.io``,
and one-component names live under ``library/``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from urllib.parse import parse_qsl, urlencode

from modelcache._plan import Selection
from modelcache._sources import Source, redact

__all__ = [
    "DEFAULT_TAG",
    "DOCKER_HUB",
    "Reference",
    "api_host",
    "host_of",
    "is_loopback",
    "parse_reference",
]

DEFAULT_TAG = "latest"
#: the name Docker Hub goes by in references; the host its API answers at
DOCKER_HUB = ("docker.io", "registry-1.docker.io")
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(
    r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::\d{1,5})?$"
)
_QUERY_KEYS = ("include", "exclude")


@dataclass(frozen=True)
class Reference:
    """One artifact in one registry.

    Attributes:
        registry: ``host[:port]`` as it names the registry (``docker.io`` for Docker Hub).
        repository: the repository's path (``org/model``).
        tag: the tag asked for, if any (``latest`` when neither a tag nor a digest was given).
        digest: ``sha256:<hex>`` of the manifest when the reference is pinned.
        selection: which layers to take, by title (``?include=`` / ``?exclude=``).
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None = None
    selection: Selection = field(default_factory=Selection)

    @property
    def pinned(self) -> bool:
        """Whether a digest names the manifest: its content can never change."""
        return self.digest is not None

    @property
    def manifest_reference(self) -> str:
        """What follows ``/manifests/`` in the API: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def host(self) -> str:
        """The host name alone (no port, no brackets)."""
        return host_of(self.registry)

    @property
    def api_host(self) -> str:
        """``host[:port]`` the API is reached at (Docker Hub's differs from its name)."""
        return api_host(self.registry)

    @property
    def loopback(self) -> bool:
        """Whether the registry runs on this machine (plain http is then the default)."""
        return is_loopback(self.registry)

    def at(self, digest: str) -> Reference:
        """The same reference pinned to ``digest`` (the tag kept for display)."""
        return replace(self, digest=digest)

    def url(self, *, selection: bool = True) -> str:
        """The reference as an ``oci://`` URL (never carries credentials)."""
        text = f"oci://{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        if selection and self.selection:
            query = (
                [("include", ",".join(self.selection.include))] if self.selection.include else []
            )
            if self.selection.exclude:
                query.append(("exclude", ",".join(self.selection.exclude)))
            text += "?" + urlencode(query, safe="*,/")
        return text

    def __str__(self) -> str:
        return self.url()


def host_of(registry: str) -> str:
    """The host name of ``host[:port]`` (no port, no brackets)."""
    host = re.sub(r":\d+$", "", registry) if not registry.endswith("]") else registry
    return host.strip("[]")


def api_host(registry: str) -> str:
    """``host[:port]`` a registry's API answers at (Docker Hub's differs from its name)."""
    return DOCKER_HUB[1] if registry == DOCKER_HUB[0] else registry


def is_loopback(registry: str) -> bool:
    """Whether ``registry`` (``host[:port]``) is on this machine."""
    host = host_of(registry).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_reference(url: str) -> Reference:
    """Parse an ``oci://`` URL; raises ``ValueError`` naming what is wrong (never a secret)."""
    if not url.lower().startswith("oci://"):
        raise ValueError(f"expected an oci:// URL, got {redact(url)}")
    rest, _, query = url[len("oci://") :].partition("?")
    rest = rest.split("#", 1)[0]
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        raise ValueError(
            "an oci:// URL cannot carry credentials: pass storage_options={'oci': "
            "{'username': ..., 'password': ...}} or log in with docker/oras"
        )
    if not slash or not path.strip("/") or not _HOST.match(netloc):
        raise ValueError(
            f"expected oci://<registry>[:<port>]/<repository>[:<tag>|@sha256:<digest>], "
            f"got {redact(url)}"
        )
    path = path.strip("/")
    digest = None
    if "@" in path:
        path, _, digest = path.partition("@")
        if not _DIGEST.match(digest):
            raise ValueError(
                f"bad digest {digest!r} in {redact(url)}: expected sha256: and 64 hex digits"
            )
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG.match(tag):
            raise ValueError(f"bad tag {tag!r} in {redact(url)}")
    registry = netloc.lower()
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB[0]
        if "/" not in path:
            path = f"library/{path}"
    if not _REPOSITORY.match(path):
        raise ValueError(
            f"bad repository name {path!r} in {redact(url)}: lowercase letters, digits and "
            "separators (. _ __ -), components joined by /"
        )
    for name, _value in parse_qsl(query, keep_blank_values=True):
        if name not in _QUERY_KEYS:
            raise ValueError(f"unknown parameter {name!r} in {redact(url)} (include, exclude)")
    selection = Selection.from_source(Source(f"oci://{netloc}/?{query}")) if query else Selection()
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest, selection)
