"""Writing refs: a download (plan -> fetch what is not stored -> verify -> publish) and a
derived entry, each once, under the ref's lock, while other writers wait and then read it."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelcache._fetch import fetch_plan
from modelcache._hashing import hash_file, manifest_digest
from modelcache._plan import Plan, RemoteFile
from modelcache._planners import plan as plan_source
from modelcache._posix import FileLock
from modelcache._sources import Source
from modelcache._transfer import Progress, TransferOptions, discard_part
from modelcache.errors import IntegrityError

from ._entries import Fetched
from ._layout import Layer
from ._locks import claim_part, lock_or_wait
from ._names import unique
from ._store import Store, entry_meta

__all__ = ["derive", "download"]

log = logging.getLogger("modelcache")


def _once(
    store: Store,
    key: str,
    published: Callable[[], Fetched | None],
    write: Callable[[Layer], Fetched],
    *,
    timeout: float,
    cancel: threading.Event | None = None,
) -> Fetched:
    """``write`` the ref ``key`` under its lock; or what another writer published meanwhile."""
    layer = store.ready_to_write()
    lock = FileLock(layer.locks / f"{key}.lock")
    hit = lock_or_wait(lock, layer.tmp, key, published, timeout=timeout, cancel=cancel)
    if hit is not None:
        return hit
    try:
        return published() or write(layer)
    finally:
        lock.release()


def download(
    store: Store,
    source: Source,
    digest: str | None,
    progress: Progress,
    cancel: threading.Event | None,
    *,
    replace: bool,
    transfer: TransferOptions,
    lock_timeout: float,
) -> Fetched:
    """Fetch ``source`` into the writable layer as one ref (``replace``: over the one there)."""

    def published() -> Fetched | None:
        return None if replace else store.find(source, digest, {})

    def write(layer: Layer) -> Fetched:
        plan = plan_source(source, transfer)
        declared = plan.files[0].sha256 if plan.kind == "file" and plan.files else None
        if digest is not None and declared is not None and declared != digest:
            raise IntegrityError(
                f"sha256 mismatch: expected {digest}, the store says {declared}; "
                "nothing was downloaded"
            )
        return _fetch_and_publish(store, layer, source, plan, digest, progress, cancel, replace)

    return _once(store, source.key, published, write, timeout=lock_timeout, cancel=cancel)


def _fetch_and_publish(
    store: Store,
    layer: Layer,
    source: Source,
    plan: Plan,
    digest: str | None,
    progress: Progress,
    cancel: threading.Event | None,
    replace: bool,
) -> Fetched:
    key, name = source.key, plan.name or source.name
    stored = {i: store.sound_blob(f.sha256, f.size) for i, f in enumerate(plan.files) if f.sha256}
    todo = [f for i, f in enumerate(plan.files) if stored.get(i) is None]
    started = time.monotonic()
    log.info("downloading %s into %s", source.redacted, layer.refs / key)

    def claim(file: RemoteFile) -> Path:
        return claim_part(layer.tmp, f"{key}.{_file_id(file.path)}")

    todo_plan = Plan(plan.kind, todo, plan.etag, plan.meta, plan.transfer)
    fetched = iter(fetch_plan(todo_plan, claim, progress=progress, cancel=cancel))
    records: list[dict[str, Any]] = []
    parts: dict[str, Path] = {}
    blobs: dict[str, Path] = {}
    etag, bytes_fetched = plan.etag, 0
    for i, file in enumerate(plan.files):
        relative = name if plan.kind == "file" else f"{name}/{file.path}"
        blob = stored.get(i)
        if blob is not None:
            sha, size = str(file.sha256), blob.stat().st_size
            blobs[relative] = blob
        else:
            done = next(fetched)
            sha, size = done.result.sha256, done.result.size
            parts[relative] = done.part
            etag = etag or done.result.etag
            bytes_fetched += done.result.fetched
        records.append({"path": relative, "size": size, "sha256": sha})
    if plan.kind == "file":
        entry_digest = records[0]["sha256"]
    else:
        entry_digest = manifest_digest(
            (f.path, r["sha256"]) for f, r in zip(plan.files, records, strict=True)
        )
    if digest is not None and entry_digest != digest:
        for part in parts.values():
            discard_part(part)
        raise IntegrityError(
            f"sha256 mismatch: expected {digest}, got {entry_digest}; nothing was cached"
        )
    log.info(
        "downloaded %s (%d files, %d bytes, %d fetched, %d already stored) in %.2fs",
        source.redacted,
        len(records),
        sum(r["size"] for r in records),
        bytes_fetched,
        len(blobs),
        time.monotonic() - started,
    )
    meta = entry_meta(source, plan.kind, entry_digest, etag, records, plan.meta, name=name)
    hit = store.publish(
        layer,
        meta,
        parts,
        blobs,
        label=source.redacted,
        replace=replace,
        published=lambda: store.find(source, digest, {}),
    )
    for part in parts.values():
        discard_part(part)  # what the transfer kept beside it to resume
    return hit


def derive(
    store: Store, key: str, source: Source, produce: Callable[[Path], None], *, lock_timeout: float
) -> Fetched:
    """The ref ``key`` of a file that ``produce(path)`` writes, made once (see
    :meth:`Cache.derive`)."""

    def published() -> Fetched | None:
        return store.find_key(key, source.redacted)

    def write(layer: Layer) -> Fetched:
        part = layer.tmp / f"{key}.{unique()}.part"
        try:
            produce(part)
            size, sha = part.stat().st_size, hash_file(part)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        record = {"path": source.name, "size": size, "sha256": sha}
        meta = entry_meta(source, "file", sha, None, [record], key=key)
        return store.publish(
            layer, meta, {source.name: part}, {}, label=source.redacted, published=published
        )

    return published() or _once(store, key, published, write, timeout=lock_timeout)


def _file_id(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()[:16]
