"""What a source names, before any byte is fetched: a plan of files with sizes and digests.

A planner (``_planners/``) asks the origin; the cache fetches the plan's files into part files
(``_fetch.py``), verifies them and publishes the entry. Plans know nothing of the cache.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ._sources import Source
from ._transfer import Reader, TransferOptions

__all__ = ["Plan", "RemoteFile", "Selection"]


@dataclass(frozen=True)
class Selection:
    """Which files of a directory to fetch: ``include`` / ``exclude`` glob patterns.

    Patterns match the path relative to the directory; ``*`` also matches ``/``, and a pattern
    ending in ``/`` names a whole sub-directory (the Hub's ``allow_patterns`` rules).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def from_source(cls, source: Source) -> Selection:
        """The ``include=`` and ``exclude=`` query parameters (comma-separated, repeatable)."""
        found: dict[str, list[str]] = {"include": [], "exclude": []}
        for name, value in parse_qsl(urlsplit(source.url).query):
            if name in found:
                found[name] += [p.strip() for p in value.split(",") if p.strip()]
        return cls(tuple(found["include"]), tuple(found["exclude"]))

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def wants(self, relative: str) -> bool:
        """Whether the file at ``relative`` is selected."""
        if self.include and not any(_matches(relative, p) for p in self.include):
            return False
        return not any(_matches(relative, p) for p in self.exclude)

    def describe(self) -> str:
        """`` matching include=a,b exclude=c`` (empty when nothing is filtered)."""
        said = [
            f"{n}={','.join(v)}"
            for n, v in (("include", self.include), ("exclude", self.exclude))
            if v
        ]
        return f" matching {' '.join(said)}" if said else ""


def _matches(path: str, pattern: str) -> bool:
    if pattern.endswith("/"):
        pattern += "*"
    return fnmatch.fnmatchcase(path, pattern)


@dataclass(frozen=True)
class RemoteFile:
    """One file of a plan.

    Attributes:
        path: the path relative to the directory (``""`` for a single-file entry).
        size: bytes, when the origin said.
        open_reader: makes a :class:`Reader` for the file with the given transfer options.
        sha256: the digest the origin vouches for (Hub LFS files, mirrored objects, OCI layers).
        git_oid: the git blob id the Hub gives for a small (non-LFS) file, checked.
    """

    path: str
    size: int | None
    open_reader: Callable[[TransferOptions], Reader]
    sha256: str | None = None
    git_oid: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a source names: ``kind`` ``"file"`` or ``"directory"``, its files, and metadata.

    ``etag`` is the origin's validator for the whole entry (an object's ETag, a Hub commit);
    ``meta`` is recorded in the entry (a resolved revision); ``transfer`` the options to fetch
    with (a store may prefer other chunk sizes); ``name`` what the entry's file or directory is
    called when the origin says (an OCI layer's title), else the source's own name.
    """

    kind: str
    files: list[RemoteFile]
    etag: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    transfer: TransferOptions = field(default_factory=TransferOptions)
    name: str | None = None
