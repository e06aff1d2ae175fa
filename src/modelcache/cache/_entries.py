"""What the cache tells its callers: entries, fetch results, problems found."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ._layout import Ref

__all__ = ["Entry", "Fetched", "Problem"]


@dataclass(frozen=True)
class Entry:
    """One cached model (a file or a directory of files): one source fetched, or a derived entry."""

    key: str
    source: str
    path: Path
    size: int
    sha256: str
    last_used: float
    created: float
    etag: str | None
    kind: str
    read_only: bool

    @classmethod
    def of(cls, ref: Ref, read_only: bool) -> Entry:
        """The entry a published ref describes."""
        last_used = ref.last_used
        try:
            created = datetime.fromisoformat(ref.meta.get("created", "")).timestamp()
        except ValueError:
            created = last_used
        return cls(
            key=ref.key,
            source=ref.meta.get("source", ""),
            path=ref.path,
            size=int(ref.meta["size"]),
            sha256=ref.sha256,
            last_used=last_used,
            created=created,
            etag=ref.meta.get("etag"),
            kind=ref.meta.get("kind", "file"),
            read_only=read_only,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (``modelcache ls --json``)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


@dataclass(frozen=True)
class Problem:
    """Something :meth:`Cache.verify` found wrong with an entry."""

    key: str
    problem: str

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}"


@dataclass(frozen=True)
class Fetched:
    """The result of :meth:`Cache.fetch_details`."""

    path: Path
    cache_hit: bool
    sha256: str | None
    size: int | None
    source: str
    key: str | None = None
