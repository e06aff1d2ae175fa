"""Whether a file on disk still holds the bytes that were verified, without re-hashing it.

A blob this cache published carries a seal: its modification time is set to :data:`SEAL_NS`,
and any write through the file system moves it. Other files (local sources used in place, files
of read-only layers copied without their times) are re-hashed once; their stamp (size, time,
inode) is then remembered in the writable cache's ``.trusted`` directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

from modelcache._hashing import hash_file

from ._names import unique

__all__ = ["SEAL_NS", "Trust", "seal"]

log = logging.getLogger("modelcache")

SEAL_NS = 946_684_800 * 10**9
"""2000-01-01T00:00:00Z: the modification time of every published blob."""


def seal(path: Path) -> None:
    """Mark ``path`` as verified (see the module doc)."""
    os.utime(path, ns=(SEAL_NS, SEAL_NS))


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class Trust:
    """Checks files against their recorded size and sha256; remembers stamps in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def holds(self, path: Path, size: int | None, sha256: str, *, reseal: bool) -> bool:
        """Whether ``path`` has ``size`` bytes hashing to ``sha256``: by its seal or a remembered
        stamp, else by re-hashing. A file found good is sealed again (``reseal``, for files this
        cache owns) or its stamp remembered; a missing file is not good."""
        try:
            st = path.stat()
        except OSError:
            return False
        if size is not None and st.st_size != size:
            return False
        if st.st_mtime_ns == SEAL_NS or _stamp(st) == self._remembered(path, sha256):
            return True
        if hash_file(path) != sha256:
            return False
        try:
            if not reseal:
                raise PermissionError("not this cache's file")
            seal(path)
        except OSError:
            self.remember(path, sha256)
        return True

    def _record(self, path: Path) -> Path:
        digest = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def _remembered(self, path: Path, sha256: str) -> list[int] | None:
        try:
            data = json.loads(self._record(path).read_text())
            if data.get("path") != str(path.absolute()) or data.get("sha256") != sha256:
                return None
            return list(data["stamp"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember(self, path: Path, sha256: str) -> None:
        """Record that ``path``, as it is now, hashes to ``sha256``."""
        with contextlib.suppress(OSError):
            record = self._record(path)
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f"{record.name}.{unique()}")
            stamp = _stamp(path.stat())
            tmp.write_text(
                json.dumps({"path": str(path.absolute()), "stamp": stamp, "sha256": sha256})
            )
            os.replace(tmp, record)
