"""Every digest modelcache computes: a file's sha256, a directory's manifest digest, a git blob id.

The manifest digest of a directory is the sha256 of one line ``"<sha256>  <relative path>\\n"``
per file, sorted by path (``sha256sum``'s output format), so ``sha256sum`` can check it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["git_blob_id", "hash_file", "manifest_digest", "normalize_sha256"]

_BLOCK = 8 << 20
_HEX = frozenset("0123456789abcdef")


def _blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(_BLOCK):
            yield block


def hash_file(path: Path) -> str:
    """The sha256 of a file, read in large blocks."""
    hasher = hashlib.sha256()
    for block in _blocks(path):
        hasher.update(block)
    return hasher.hexdigest()


def git_blob_id(path: Path) -> str:
    """The git object id of a file's content (``git hash-object``)."""
    hasher = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    for block in _blocks(path):
        hasher.update(block)
    return hasher.hexdigest()


def manifest_digest(records: Iterable[tuple[str, str]]) -> str:
    """The digest of a directory from ``(relative path, sha256)`` pairs (see the module doc)."""
    lines = "".join(f"{digest}  {path}\n" for path, digest in sorted(records))
    return hashlib.sha256(lines.encode()).hexdigest()


def normalize_sha256(value: str | None) -> str | None:
    """Lowercase a hex digest (``sha256:`` prefix allowed); anything else raises ``ValueError``."""
    if value is None:
        return None
    digest = value.strip().lower()
    digest = digest.removeprefix("sha256:")
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError(f"sha256 must be 64 hex characters, got {value!r}")
    return digest
