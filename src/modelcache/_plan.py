"""What a source names, before any byte is fetched: a plan of files with sizes and digests.

A planner (``_planners/``) asks the origin; the cache fetches the plan's files into part files
(``_fetch.py``), verifies them and publishes the entry. Plans know nothing of the cache.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ._sources import Source
from ._transfer import FatalError, Reader, TransferOptions

__all__ = ["Plan", "RemoteFile", "Selection", "relative_path"]

_DRIVE = re.compile(r"^[A-Za-z]:")


def relative_path(name: str) -> str:
    """``name``, a file's path as an origin lists it, once checked to stay inside the entry.

    The one check every origin's names pass (Hub siblings, S3/GCS keys under a prefix, OCI
    layer titles): raises :class:`FatalError` for an empty or absolute path, a ``.`` or ``..``
    component, an empty component, a backslash, a NUL or a drive letter, so no listing can
    make the cache write outside the entry's directory.
    """
    parts = name.split("/")
    if (
        not name
        or "\\" in name
        or "\0" in name
        or _DRIVE.match(name)
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise FatalError(f"{name!r} is not a relative path inside the entry")
    return name


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

    def __post_init__(self) -> None:
        """Every planner's plan passes here: the name and a directory's paths are checked by
        :func:`relative_path`, each path once, and none is both a file and a directory."""
        if self.name is not None and "/" in relative_path(self.name):
            raise FatalError(f"{self.name!r} is not a relative path inside the entry")
        if self.kind != "directory":
            return
        seen: set[str] = set()
        for file in self.files:
            seen.add(relative_path(file.path))
        if len(seen) < len(self.files):
            raise FatalError("the origin lists the same file twice")
        for path in seen:
            parent = path.rpartition("/")[0]
            while parent:
                if parent in seen:
                    raise FatalError(f"{parent!r} is listed both as a file and as a directory")
                parent = parent.rpartition("/")[0]
