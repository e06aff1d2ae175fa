"""One cache directory (a layer): each file's bytes once, as a blob named by its sha256, and
refs that name blobs, one per source a person fetched.

::

    <root>/layout.json            {"layout": 2}: the version of this layout
    <root>/blobs/<sha256>         a file's bytes, once, however many sources name them
    <root>/refs/<key>/meta.json   one source (or derived entry): what it is, its files' blobs
    <root>/refs/<key>/<name>      the file, a hard link to its blob (or a directory of them)
    <root>/.locks/                <key>.lock while a ref is written, <key>.use while it is used
    <root>/.tmp/                  part files and staging directories, unique to each writer
    <root>/.trash/                what is being deleted
    <root>/.trusted/              stamps of verified files that are not sealed blobs

A ref is published whole, with one atomic ``rename`` of a staging directory, and never changes
afterwards. A ref's files are hard links to blobs (symbolic links when the blob is in another
layer or the filesystem has no hard links), so a blob whose link count falls to one is named by
no ref and is garbage.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcache._posix import FileLock
from modelcache.errors import ModelCacheError

from ._names import now_iso, unique
from ._trust import SEAL_NS, seal

__all__ = ["LAYOUT", "Layer", "LayoutError", "Ref", "read_json"]

log = logging.getLogger("modelcache")

LAYOUT = 2
"""The version of the layout this module reads and writes."""

_META = "meta.json"
_VERSION_FILE = "layout.json"


class LayoutError(ModelCacheError):
    """A cache directory was written by another version of modelcache."""


@dataclass(frozen=True)
class Ref:
    """A published ref: its directory, its ``meta.json`` and when it was last used.

    ``last_used`` is the time of the ``meta.json`` that was read (the same open file), so a ref
    another process evicts meanwhile still has one.
    """

    directory: Path
    meta: Mapping[str, Any]
    last_used: float = field(compare=False)

    @property
    def key(self) -> str:
        """The ref's key (the hash of its source's URL, or a derived entry's key)."""
        return str(self.meta["key"])

    @property
    def path(self) -> Path:
        """The file or directory the ref names."""
        return self.directory / str(self.meta["name"])

    @property
    def sha256(self) -> str:
        """The file's sha256, or a directory's manifest digest."""
        return str(self.meta["sha256"])

    @property
    def files(self) -> list[dict[str, Any]]:
        """``{"path", "size", "sha256"}`` per file, ``path`` relative to the ref's directory."""
        return list(self.meta["files"])


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{unique()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o664)
    os.replace(tmp, path)


class Layer:
    """The layout of one cache directory (see the module doc)."""

    def __init__(self, root: Path, read_only: bool) -> None:
        self.root = root
        self.read_only = read_only
        self.refs = root / "refs"
        self.blobs = root / "blobs"
        self.tmp = root / ".tmp"
        self.locks = root / ".locks"
        self.trash = root / ".trash"

    def __repr__(self) -> str:
        return f"Layer({str(self.root)!r}, read_only={self.read_only})"

    # -- version --------------------------------------------------------------------------------

    def check_version(self) -> None:
        """Raise :class:`LayoutError` when the directory holds another layout."""
        data = read_json(self.root / _VERSION_FILE)
        found = data.get("layout") if isinstance(data, dict) else None
        if found is None and self._holds_layout_1():
            found = 1
        if found is not None and found != LAYOUT:
            if self.read_only:
                remedy = (
                    "rebuild it with this version (`modelcache fetch ...` into a new directory)"
                )
            else:
                remedy = (
                    f"clear it with `modelcache clear --cache {self.root}` "
                    "(its models are fetched again)"
                )
            raise LayoutError(
                f"the cache at {self.root} has layout {found}, this modelcache reads layout "
                f"{LAYOUT}: {remedy}"
            )

    def _holds_layout_1(self) -> bool:
        """modelcache 0.x kept ``<root>/<key>/meta.json``, with no version file."""
        with contextlib.suppress(OSError):
            for child in self.root.iterdir():
                if not child.name.startswith(".") and (child / _META).is_file():
                    return True
        return False

    def ensure(self) -> None:
        """Create the directories a writer needs (refs and blobs come with the first ref)."""
        for directory in (self.tmp, self.locks):
            directory.mkdir(parents=True, exist_ok=True)

    # -- refs -----------------------------------------------------------------------------------

    def ref(self, key: str) -> Ref | None:
        """The published ref ``key``, if there is one."""
        directory = self.refs / key
        try:
            with open(directory / _META, "rb") as file:
                used = os.fstat(file.fileno()).st_mtime
                meta = json.loads(file.read())
        except (OSError, ValueError):
            return None
        required = ("key", "name", "size", "sha256", "files")
        if not isinstance(meta, dict) or any(k not in meta for k in required):
            return None
        return Ref(directory, meta, used)

    def all_refs(self) -> Iterator[Ref]:
        """Every published ref, sorted by key."""
        if not self.refs.is_dir():
            return
        for directory in sorted(self.refs.iterdir()):
            ref = self.ref(directory.name)
            if ref is not None:
                yield ref

    def touch(self, ref: Ref) -> None:
        """Mark ``ref`` as used now (least-recently-used eviction reads this)."""
        with contextlib.suppress(OSError):
            os.utime(ref.directory / _META)

    def discard(self, directory: Path) -> bool:
        """Move ``directory`` out of sight, then delete it; False when it was already gone."""
        self.trash.mkdir(parents=True, exist_ok=True)
        trash = self.trash / f"{directory.name}.{unique()}"
        try:
            os.rename(directory, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    # -- blobs ----------------------------------------------------------------------------------

    def blob(self, sha256: str) -> Path:
        """Where the blob of ``sha256`` lives (it may not exist)."""
        return self.blobs / sha256

    def _blob_lock(self) -> FileLock:
        return FileLock(self.locks / "blobs.lock")

    def publish(
        self,
        key: str,
        meta: Mapping[str, Any],
        parts: Mapping[str, Path],
        blobs: Mapping[str, Path],
        *,
        replace: bool = False,
    ) -> Ref | None:
        """Publish the ref ``key`` whole; ``None`` when another writer published it first.

        ``parts``: relative path -> a verified part file of this writer (it becomes the blob of
        its sha256, unless that blob exists); ``blobs``: relative path -> an existing blob (in
        any layer). ``meta["files"]`` gives each path's sha256. ``replace`` swaps out a ref
        that exists (a refresh).
        """
        digests = {record["path"]: record["sha256"] for record in meta["files"]}
        if not (self.root / _VERSION_FILE).exists():
            _write_json(self.root / _VERSION_FILE, {"layout": LAYOUT})
        for directory in (self.refs, self.blobs):
            directory.mkdir(exist_ok=True)
        staging = self.tmp / f"{key}.{unique()}.d"
        staging.mkdir()
        lock = self._blob_lock()
        lock.acquire(timeout=60)  # garbage collection waits until the staged links exist
        try:
            for relative, part in parts.items():
                blob = self._adopt(part, digests[relative])
                _link(blob, staging / relative)
            for relative, blob in blobs.items():
                _link(blob, staging / relative)
            _write_json(staging / _META, {"format": LAYOUT, **meta, "created": now_iso()})
            final = self.refs / key
            if final.exists() and (replace or self.ref(key) is None):
                # a refreshed ref, or a broken leftover: swapped in one step where the system
                # can (the old one is then in staging and deleted below), else moved away first
                if _exchange(staging, final):
                    return self.ref(key)
                self.discard(final)
            try:
                os.rename(staging, final)
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                return None
        finally:
            lock.release()
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return self.ref(key)

    def _adopt(self, part: Path, sha256: str) -> Path:
        """Make ``part`` the blob of ``sha256``, or drop it when a sound blob exists already."""
        blob = self.blob(sha256)
        size = part.stat().st_size
        with contextlib.suppress(OSError):
            st = blob.stat()
            if st.st_size == size and st.st_mtime_ns == SEAL_NS:
                part.unlink()
                return blob
        os.chmod(part, 0o664)
        seal(part)
        os.replace(part, blob)
        return blob

    def collect_garbage(self) -> int:
        """Delete blobs no ref names; the bytes freed."""
        if not self.blobs.is_dir():
            return 0
        named = {r["sha256"] for ref in self.all_refs() for r in ref.files}
        freed = 0
        lock = self._blob_lock()
        if not lock.acquire(timeout=0):
            return 0  # a writer is publishing: collect next time
        try:
            for blob in self.blobs.iterdir():
                with contextlib.suppress(OSError):
                    st = blob.stat()
                    if st.st_nlink == 1 and blob.name not in named:
                        blob.unlink()
                        freed += st.st_size
        finally:
            lock.release()
        return freed

    def stored_bytes(self) -> int:
        """Bytes held by this layer's blobs (each counted once)."""
        total = 0
        if self.blobs.is_dir():
            for blob in self.blobs.iterdir():
                with contextlib.suppress(OSError):
                    total += blob.stat().st_size
        return total


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the filesystem cannot, and nothing was changed."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return bool(done == 0)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _link(blob: Path, target: Path) -> None:
    """Name ``blob`` at ``target``: a hard link, else (another filesystem) a symbolic link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(blob, target)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        os.symlink(blob.absolute(), target)
