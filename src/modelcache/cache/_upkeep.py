"""Looking after a cache: re-hashing (verify), finding an entry by a prefix, evicting refs
(remove, prune) and clearing a directory of any layout version."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from modelcache._hashing import hash_file
from modelcache._posix import FileLock, Probe, probe_lock

from ._entries import Entry, Problem
from ._layout import Layer, read_json
from ._store import Store
from ._trust import SEAL_NS, seal

__all__ = ["clear", "evict", "find_entry", "prune", "verify"]

log = logging.getLogger("modelcache")


def verify(store: Store) -> list[Problem]:
    """Re-hash every stored file (each blob once); the problems found."""
    problems: list[Problem] = []
    hashed: dict[tuple[int, int], str] = {}
    for layer, ref in store.all_refs():
        for record in ref.files:
            path = ref.directory / record["path"]
            problem = _check_file(store, layer, path, record, hashed)
            if problem is not None and layer.ref(ref.key) == ref:
                # once more: another process may have evicted or replaced the ref meanwhile
                # (a ref no longer published is no problem of what the cache holds)
                hashed.clear()
                problem = _check_file(store, layer, path, record, hashed)
                if problem is not None:
                    problems.append(Problem(ref.key, f"{record['path']} {problem}"))
    return problems


def _check_file(
    store: Store,
    layer: Layer,
    path: Path,
    record: Mapping[str, Any],
    hashed: dict[tuple[int, int], str],
) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return "is missing"
    if st.st_size != record["size"]:
        return f"has {st.st_size} bytes, expected {record['size']}"
    inode = (st.st_dev, st.st_ino)
    if inode not in hashed:
        hashed[inode] = hash_file(path)
    if hashed[inode] != record["sha256"]:
        return f"sha256 mismatch: expected {record['sha256']}, found {hashed[inode]}"
    if st.st_mtime_ns != SEAL_NS:  # sound: trusted again without re-hashing on the next use
        try:
            if layer.read_only:
                raise PermissionError("read-only layer")
            seal(path)
        except OSError:
            store.trust.remember(path, record["sha256"])
    return None


def find_entry(entries: list[Entry], key: str, where: Path) -> Entry:
    """The writable entry whose key or sha256 starts with ``key``; ``KeyError`` when none or
    several match."""
    matches = {
        e.key: e
        for e in entries
        if key and not e.read_only and (e.key.startswith(key) or e.sha256.startswith(key))
    }
    if not matches:
        raise KeyError(f"no entry {key!r} in {where} (see `modelcache ls`)")
    if len(matches) > 1:
        raise KeyError(f"{key!r} matches {len(matches)} entries; give more of the key")
    return next(iter(matches.values()))


def evict(store: Store, key: str) -> bool:
    """Delete the writable layer's ref ``key`` unless a process uses or writes it."""
    layer = store.writable()
    lock = FileLock(layer.locks / f"{key}.lock")
    if not lock.acquire(timeout=0):
        return False
    try:
        lease = store.lease_path(layer, key)
        if store.leases.holds(lease):
            return False
        with _exclusive(lease) as free:
            if not free or not layer.discard(layer.refs / key):
                return False
        log.info("evicted %s", key[:16])
        return True
    finally:
        lock.release()


def prune(store: Store, max_bytes: int) -> list[Entry]:
    """Evict least recently used refs until the writable layer's blobs take ``max_bytes``."""
    layer = store.writable()
    total = layer.stored_bytes()
    evicted = []
    for ref in sorted(layer.all_refs(), key=lambda r: r.last_used):
        if total <= max_bytes:
            break
        entry = Entry.of(ref, False)
        if evict(store, ref.key):
            layer.collect_garbage()
            total = layer.stored_bytes()
            evicted.append(entry)
    return evicted


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Hold ``path`` exclusively while the block runs; yields False when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        yield probe_lock(fd) is not Probe.BUSY
    finally:
        os.close(fd)


def clear(root: Path) -> int:
    """Delete what modelcache keeps in ``root``, whatever its layout version; the number of
    entries removed."""
    if not root.is_dir():
        return 0
    layer = Layer(root, False)
    removed = 0
    for child in sorted(root.iterdir()):
        if child.name == "refs":
            removed += sum(1 for _ in child.iterdir())
        elif child.is_dir() and read_json(child / "meta.json") is not None:  # a layout 1 entry
            removed += 1
        elif child.name not in ("blobs", "layout.json") and not child.name.startswith("."):
            continue  # not modelcache's
        if child.is_dir():
            layer.discard(child)
        else:
            child.unlink(missing_ok=True)
    return removed
