"""The :class:`Cache` façade: find a source's copy in the layers, or fetch it once and publish it.

One path for every remote source: find a ref -> take the ref's write lock -> plan (what files,
sizes, digests) -> fetch the files not already stored into part files -> verify -> publish
blobs and the ref. Models and sources are named on errors here, at the boundary, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelcache import config
from modelcache._fetch import fetch_plan
from modelcache._hashing import hash_file, manifest_digest, normalize_sha256
from modelcache._plan import Plan, RemoteFile
from modelcache._planners import plan as plan_source
from modelcache._posix import FileLock, Leases, Probe, probe_lock
from modelcache._transfer import FatalError, Progress, TransferOptions, discard_part
from modelcache.errors import (
    IntegrityError,
    ModelCacheError,
    NotCachedError,
    SourceError,
)
from modelcache.sources import Source, SourceLike, parse_sources

from ._entries import Entry, Fetched, Problem
from ._layout import Layer, Ref
from ._locks import claim_part, lock_or_wait
from ._names import unique
from ._progress import progress_bar
from ._trust import SEAL_NS, Trust, seal

__all__ = ["Cache"]

log = logging.getLogger("modelcache")


class Cache:
    """A directory of verified model files, shared safely by threads, processes and hosts.

    Every file's bytes are stored once, named by their sha256; each source fetched is a ref to
    them, found again by its URL with or without a sha256 (see ``docs/cache.md``).

    Args:
        path: the writable cache directory; default ``$MODELCACHE_HOME``, else the platform's
            user cache directory.
        read_only_paths: caches laid down earlier (baked into an image, a shared volume),
            searched first and never written; default ``$MODELCACHE_READ_ONLY_PATHS``.
        offline: never touch the network; default ``$MODELCACHE_OFFLINE``.
        transfer: how downloads behave (connections, retries, timeouts).
        lock_timeout: seconds to wait on another writer of the same entry that makes no
            progress before raising :class:`LockTimeoutError`.
    """

    _leases = Leases()  # one per process: leases are per process, not per Cache object

    def __init__(
        self,
        path: SourceLike | None = None,
        read_only_paths: Sequence[SourceLike] | None = None,
        offline: bool | None = None,
        *,
        transfer: TransferOptions | None = None,
        lock_timeout: float = 300.0,
    ) -> None:
        self._path = Path(path).expanduser() if path is not None else None
        self._read_only = (
            [Path(p).expanduser() for p in read_only_paths] if read_only_paths is not None else None
        )
        self._offline = offline
        self.transfer = transfer or TransferOptions()
        self.lock_timeout = lock_timeout
        self._checked: set[tuple[Path, bool]] = set()

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r})"

    # -- configuration, read when used ------------------------------------------------------

    @property
    def path(self) -> Path:
        """The writable cache directory."""
        return self._path if self._path is not None else config.cache_home()

    @property
    def read_only_paths(self) -> list[Path]:
        """The read-only layers, searched before :attr:`path`."""
        return self._read_only if self._read_only is not None else config.read_only_paths()

    @property
    def offline(self) -> bool:
        """Whether the network may not be used."""
        return self._offline if self._offline is not None else config.offline()

    # -- layers -------------------------------------------------------------------------------

    def _layer(self, root: Path, read_only: bool) -> Layer:
        layer = Layer(root, read_only)
        if (root, read_only) not in self._checked:
            layer.check_version()
            self._checked.add((root, read_only))
        return layer

    def _writable(self) -> Layer:
        return self._layer(self.path, False)

    def _layers(self) -> list[Layer]:
        return [self._layer(p, True) for p in self.read_only_paths] + [self._writable()]

    @property
    def _trust(self) -> Trust:
        return Trust(self.path / ".trusted")

    def _ready_to_write(self) -> Layer:
        layer = self._writable()
        try:
            layer.ensure()
        except OSError as error:
            raise ModelCacheError(f"cannot write the cache at {self.path}: {error}") from None
        return layer

    # -- fetching -----------------------------------------------------------------------------

    def fetch(
        self,
        source: SourceLike | Sequence[SourceLike],
        sha256: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        *,
        progress: Progress | None = None,
        model: str | None = None,
        cancel: threading.Event | None = None,
        progress_bar: bool | None = None,
    ) -> Path:
        """Make sure the source's file(s) are in the cache; return the local ``Path``.

        A list of sources is a chain of mirrors tried in order. Local paths are used in place.
        No network request is made when a verified copy exists. ``progress(done, total)`` is
        called as bytes arrive; ``progress_bar`` draws a tqdm bar on stderr (``None``:
        ``$MODELCACHE_PROGRESS`` decides, else only on a terminal).
        """
        return self.fetch_details(
            source,
            sha256,
            storage_options,
            progress=progress,
            model=model,
            cancel=cancel,
            progress_bar=progress_bar,
        ).path

    def fetch_details(
        self,
        source: SourceLike | Sequence[SourceLike],
        sha256: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        *,
        progress: Progress | None = None,
        model: str | None = None,
        cancel: threading.Event | None = None,
        refresh: bool = False,
        progress_bar: bool | None = None,
    ) -> Fetched:
        """Like :meth:`fetch`, also telling whether it was a cache hit.

        ``refresh=True`` fetches a source given without sha256 again even when cached (a file
        that changed at its origin under the same URL, a branch that moved) and replaces its
        entry. A ``sha256`` that differs from the one recorded for the source fetches the
        source again: the entry is replaced only when the new bytes have that sha256.
        """
        sources = parse_sources(source, storage_options)
        digest = normalize_sha256(sha256)
        try:
            return self._fetch(
                sources, digest, progress, cancel, refresh and digest is None, progress_bar
            )
        except ModelCacheError as error:
            raise error.about(model=model) from None

    def _fetch(
        self,
        sources: list[Source],
        digest: str | None,
        progress: Progress | None,
        cancel: threading.Event | None,
        refresh: bool,
        enabled: bool | None,
    ) -> Fetched:
        remote = [s for s in sources if not s.is_local]
        recorded: dict[str, str] = {}  # source key -> the other sha256 its entry has
        if not refresh:
            for src in remote:
                hit = self._find(src, digest, recorded)
                if hit is not None:
                    return hit
            if digest is not None and remote:
                hit = self._from_blob(remote[0], digest)
                if hit is not None:
                    return hit
        attempts: list[tuple[str, str]] = []
        errors: list[ModelCacheError] = []
        for src in sources:
            try:
                try:
                    if src.is_local:
                        return self._use_local(src, digest)
                    if self.offline:
                        raise self._offline_miss(src, digest, recorded.get(src.key))
                    with progress_bar(src.name, progress, enabled) as report:
                        replace = refresh or src.key in recorded
                        return self._download(src, digest, report, cancel, replace)
                except FatalError as refusal:
                    raise SourceError(src.scrub(str(refusal)), status=refusal.status) from None
            except (SourceError, IntegrityError, NotCachedError) as error:
                attempts.append((src.redacted, error.reason))
                errors.append(error.about(source=src.redacted))
            except ModelCacheError as error:
                raise error.about(source=src.redacted) from None
        return self._all_failed(sources, errors, attempts)

    @staticmethod
    def _offline_miss(src: Source, digest: str | None, recorded: str | None) -> ModelCacheError:
        if recorded is not None:
            return IntegrityError(
                f"the cached copy has sha256 {recorded}, expected {digest}; offline, so it was "
                "not fetched again"
            )
        return NotCachedError("not in the cache and offline mode is on")

    @staticmethod
    def _all_failed(
        sources: list[Source], errors: list[ModelCacheError], attempts: list[tuple[str, str]]
    ) -> Fetched:
        if len(errors) == 1:
            raise errors[0]
        first = sources[0].redacted
        if all(isinstance(e, NotCachedError) for e in errors):
            raise NotCachedError("not in the cache and offline mode is on", source=first)
        if all(isinstance(e, IntegrityError) for e in errors):
            raise IntegrityError("every mirror sent the wrong bytes", source=first)
        raise SourceError(f"all {len(sources)} sources failed", source=first, attempts=attempts)

    def lookup(
        self,
        source: SourceLike | Sequence[SourceLike],
        sha256: str | None = None,
    ) -> Path | None:
        """The cached path for ``source`` if present and verified; never touches the network."""
        digest = normalize_sha256(sha256)
        sources = parse_sources(source)
        for src in sources:
            if src.is_local:
                if src.local_path.exists():
                    return src.local_path
                continue
            hit = self._find(src, digest, {})
            if hit is not None:
                return hit.path
        remote = [s for s in sources if not s.is_local]
        if digest is not None and remote:
            hit = self._from_blob(remote[0], digest)
            if hit is not None:
                return hit.path
        return None

    # -- hits -----------------------------------------------------------------------------------

    def _find(self, source: Source, digest: str | None, recorded: dict[str, str]) -> Fetched | None:
        """The verified entry of ``source`` in any layer; a ``digest`` it does not have is
        noted in ``recorded`` instead."""
        for layer in self._layers():
            ref = layer.ref(source.key)
            if ref is None:
                continue
            if digest is not None and ref.sha256 != digest:
                recorded[source.key] = ref.sha256
                continue
            hit = self._serve(layer, ref, source.redacted)
            if hit is not None:
                return hit
        return None

    def _serve(self, layer: Layer, ref: Ref, label: str) -> Fetched | None:
        """``ref`` as a hit, once its files are found sound and this process holds its lease."""
        for record in ref.files:
            path = ref.directory / record["path"]
            if not self._trust.holds(
                path, record["size"], record["sha256"], reseal=not layer.read_only
            ):
                log.warning(
                    "cache entry %s is corrupt (%s); it will be fetched again",
                    ref.directory,
                    record["path"],
                )
                if not layer.read_only:
                    self._drop_corrupt(layer, ref, record["sha256"])
                return None
        if not layer.read_only:
            # a ref evicted meanwhile is a miss: the lease is taken, then looked at again
            if (
                not self._leases.take(self._lease_path(layer, ref.key))
                or not ref.directory.is_dir()
            ):
                self.release(ref.key)
                return None
            layer.touch(ref)
        size = int(ref.meta["size"])
        return Fetched(ref.path, True, ref.sha256, size, label, ref.key)

    def _drop_corrupt(self, layer: Layer, ref: Ref, sha256: str) -> None:
        with contextlib.suppress(OSError):
            layer.blob(sha256).unlink()  # corrupt: no other source may link it again
        layer.discard(ref.directory)
        layer.collect_garbage()

    def _sound_blob(self, sha256: str, size: int | None) -> Path | None:
        """A blob of ``sha256`` in any layer whose bytes are sound."""
        for layer in self._layers():
            blob = layer.blob(sha256)
            if blob.is_file() and self._trust.holds(blob, size, sha256, reseal=not layer.read_only):
                return blob
        return None

    def _from_blob(self, source: Source, digest: str) -> Fetched | None:
        """An entry for ``source`` made from a blob of ``digest`` that another source fetched."""
        if source.protocol == "oci":
            return None  # its file is named by a layer title, which only the manifest tells
        blob = self._sound_blob(digest, None)
        if blob is None:
            return None
        try:
            layer = self._ready_to_write()
        except ModelCacheError:
            return None
        name = source.name
        size = blob.stat().st_size
        meta = _meta(source, "file", digest, None, [{"path": name, "size": size, "sha256": digest}])
        ref = layer.publish(source.key, meta, {}, {name: blob})
        ref = ref or layer.ref(source.key)
        log.info("%s: the blob %s is already cached; no download", source.redacted, digest[:16])
        return None if ref is None else self._serve(layer, ref, source.redacted)

    def _use_local(self, source: Source, sha256: str | None) -> Fetched:
        path = source.local_path
        if not path.exists():
            raise SourceError("no such file or directory")
        is_file = path.is_file()
        if (
            sha256 is not None
            and is_file
            and not self._trust.holds(path, None, sha256, reseal=False)
        ):
            actual = hash_file(path)
            raise IntegrityError(f"sha256 mismatch: expected {sha256}, the file has {actual}")
        size = path.stat().st_size if is_file else None
        return Fetched(path, True, sha256, size, source.redacted)

    # -- downloads ----------------------------------------------------------------------------

    def _download(
        self,
        source: Source,
        digest: str | None,
        progress: Progress,
        cancel: threading.Event | None,
        replace: bool,
    ) -> Fetched:
        layer = self._ready_to_write()
        key = source.key
        lock = FileLock(layer.locks / f"{key}.lock")

        def published() -> Fetched | None:
            return None if replace else self._find(source, digest, {})

        hit = lock_or_wait(
            lock, layer.tmp, key, published, timeout=self.lock_timeout, cancel=cancel
        )
        if hit is not None:
            return hit
        try:
            hit = published()
            if hit is not None:
                return hit
            plan = plan_source(source, self.transfer)
            declared = plan.files[0].sha256 if plan.kind == "file" and plan.files else None
            if digest is not None and declared is not None and declared != digest:
                raise IntegrityError(
                    f"sha256 mismatch: expected {digest}, the store says {declared}; "
                    "nothing was downloaded"
                )
            return self._fetch_and_publish(layer, source, plan, digest, progress, cancel, replace)
        finally:
            lock.release()

    def _fetch_and_publish(
        self,
        layer: Layer,
        source: Source,
        plan: Plan,
        digest: str | None,
        progress: Progress,
        cancel: threading.Event | None,
        replace: bool,
    ) -> Fetched:
        key, name = source.key, plan.name or source.name
        stored = {
            i: self._sound_blob(f.sha256, f.size) for i, f in enumerate(plan.files) if f.sha256
        }
        todo = [f for i, f in enumerate(plan.files) if stored.get(i) is None]
        started = time.monotonic()
        log.info("downloading %s into %s", source.redacted, layer.refs / key)

        def claim(file: RemoteFile) -> Path:
            return claim_part(layer.tmp, f"{key}.{_file_id(file.path)}")

        fetched = iter(
            fetch_plan(
                Plan(plan.kind, todo, plan.etag, plan.meta, plan.transfer),
                claim,
                progress=progress,
                cancel=cancel,
            )
        )
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
        meta = _meta(source, plan.kind, entry_digest, etag, records, plan.meta, name=name)
        ref = layer.publish(key, meta, parts, blobs, replace=replace)
        if ref is None:  # another writer published first (its lock was not held: no flock)
            hit = self._find(source, digest, {})
            if hit is None:
                raise ModelCacheError("another writer published a different entry meanwhile")
            return hit
        for part in parts.values():
            discard_part(part)  # what the transfer kept beside it to resume
        self._leases.take(self._lease_path(layer, key))
        return Fetched(ref.path, False, entry_digest, int(meta["size"]), source.redacted, key)

    # -- derived entries ----------------------------------------------------------------------

    def derive(
        self,
        key: str,
        label: str,
        produce: Callable[[Path], None],
        *,
        model: str | None = None,
    ) -> Fetched:
        """The entry ``key`` holding a file made from other data (e.g. quantized weights).

        When no layer holds it, ``produce(path)`` writes the file, which is then hashed and
        published like a download (atomically, under the entry's lock); other threads and
        processes wait and read the result. ``label`` is a URL-like description shown as the
        entry's source; its last segment names the file. ``cache_hit`` is False when
        ``produce`` ran here.
        """
        source = Source(label)
        try:
            return self._derive(key, source, produce)
        except ModelCacheError as error:
            raise error.about(model=model, source=source.redacted) from None

    def _derive(self, key: str, source: Source, produce: Callable[[Path], None]) -> Fetched:
        def published() -> Fetched | None:
            for layer in self._layers():
                ref = layer.ref(key)
                hit = None if ref is None else self._serve(layer, ref, source.redacted)
                if hit is not None:
                    return hit
            return None

        hit = published()
        if hit is not None:
            return hit
        layer = self._ready_to_write()
        lock = FileLock(layer.locks / f"{key}.lock")
        hit = lock_or_wait(lock, layer.tmp, key, published, timeout=self.lock_timeout)
        if hit is not None:
            return hit
        try:
            hit = published()
            if hit is not None:
                return hit
            part = layer.tmp / f"{key}.{unique()}.part"
            try:
                produce(part)
                size, sha = part.stat().st_size, hash_file(part)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            record = {"path": source.name, "size": size, "sha256": sha}
            ref = layer.publish(
                key, _meta(source, "file", sha, None, [record], key=key), {source.name: part}, {}
            )
            if ref is None:  # another writer published first (no working file locks)
                hit = published()
                if hit is None:
                    raise ModelCacheError("another writer published a different entry meanwhile")
                return hit
            self._leases.take(self._lease_path(layer, key))
            return Fetched(ref.path, False, sha, size, source.redacted, key)
        finally:
            lock.release()

    # -- in-use leases ------------------------------------------------------------------------

    @staticmethod
    def _lease_path(layer: Layer, key: str) -> Path:
        return layer.locks / f"{key}.use"

    def release(self, key: str) -> None:
        """Let :meth:`prune` evict the entry again (this process no longer uses it)."""
        self._leases.give_back(self.path / ".locks" / f"{key}.use")

    # -- listing, verifying, removing ---------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every entry, one per source fetched: the read-only layers' first, each sorted by key."""
        return [Entry.of(ref, layer.read_only) for layer, ref in self._all_refs()]

    def _all_refs(self) -> Iterator[tuple[Layer, Ref]]:
        for layer in self._layers():
            for ref in layer.all_refs():
                yield layer, ref

    def verify_entries(self) -> list[Problem]:
        """Re-hash every stored file (each blob once); the problems found (empty when all is well).

        Found sound, a file is trusted again without re-hashing on the next use; a corrupt one
        is reported, not removed (``modelcache rm`` removes it).
        """
        problems: list[Problem] = []
        hashed: dict[tuple[int, int], str] = {}
        for layer, ref in self._all_refs():
            for record in ref.files:
                problem = self._check_file(layer, ref.directory / record["path"], record, hashed)
                if problem is not None:
                    problems.append(Problem(ref.key, f"{record['path']} {problem}"))
        return problems

    def _check_file(
        self,
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
        if st.st_mtime_ns != SEAL_NS:
            try:
                if layer.read_only:
                    raise PermissionError("read-only layer")
                seal(path)
            except OSError:
                self._trust.remember(path, record["sha256"])
        return None

    def verify(self) -> list[str]:
        """Re-hash every entry; one line per problem found (empty when all is well)."""
        return [str(problem) for problem in self.verify_entries()]

    def entry(self, key: str) -> Entry:
        """The writable cache's entry whose key or sha256 starts with ``key``.

        Raises ``KeyError`` (with a message for people) when none or several match.
        """
        matches = {
            e.key: e
            for e in self.entries()
            if key and not e.read_only and (e.key.startswith(key) or e.sha256.startswith(key))
        }
        if not matches:
            raise KeyError(f"no entry {key!r} in {self.path} (see `modelcache ls`)")
        if len(matches) > 1:
            raise KeyError(f"{key!r} matches {len(matches)} entries; give more of the key")
        return next(iter(matches.values()))

    def remove(self, key: str) -> None:
        """Delete one entry (a unique prefix of its key or sha256 will do), and the blobs only
        it named.

        Raises ``KeyError`` when no entry matches and :class:`ModelCacheError` when a process
        is using or writing it.
        """
        full = self.entry(key).key
        if not self._evict(full):
            raise ModelCacheError(f"entry {full[:16]} is in use by a running process")
        self._writable().collect_garbage()

    def prune(self, max_bytes: int) -> list[Entry]:
        """Evict least recently used entries until the cache's blobs take at most ``max_bytes``.

        Entries that a running process uses or writes are never evicted. Returns the evicted.
        """
        layer = self._writable()
        refs = sorted(layer.all_refs(), key=lambda r: r.last_used)
        total = layer.stored_bytes()
        evicted = []
        for ref in refs:
            if total <= max_bytes:
                break
            entry = Entry.of(ref, False)
            if self._evict(ref.key):
                layer.collect_garbage()
                total = layer.stored_bytes()
                evicted.append(entry)
        return evicted

    def _evict(self, key: str) -> bool:
        layer = self._writable()
        lock = FileLock(layer.locks / f"{key}.lock")
        if not lock.acquire(timeout=0):
            return False
        try:
            lease = self._lease_path(layer, key)
            if self._leases.holds(lease):
                return False
            with _exclusive(lease) as free:
                if not free or not layer.discard(layer.refs / key):
                    return False
            log.info("evicted %s", key[:16])
            return True
        finally:
            lock.release()

    def clear(self) -> int:
        """Delete everything in the writable cache directory, whatever its layout version;
        the number of entries removed. Nothing else may be using the cache meanwhile."""
        from ._layout import read_json

        root = self.path
        removed = 0
        if not root.is_dir():
            return 0
        layer = Layer(root, False)
        for child in sorted(root.iterdir()):
            is_entry = child.is_dir() and read_json(child / "meta.json") is not None  # layout 1
            if child.name == "refs":
                removed += sum(1 for _ in child.iterdir())
            elif is_entry:
                removed += 1
            elif child.name not in ("blobs", "layout.json") and not child.name.startswith("."):
                continue  # not modelcache's
            if child.is_dir():
                layer.discard(child)
            else:
                child.unlink(missing_ok=True)
        self._checked.clear()
        return removed


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """Hold ``path`` exclusively while the block runs; yields False when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        yield probe_lock(fd) is not Probe.BUSY
    finally:
        os.close(fd)


def _file_id(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()[:16]


def _meta(
    source: Source,
    kind: str,
    sha256: str,
    etag: str | None,
    files: list[dict[str, Any]],
    extra: Mapping[str, Any] | None = None,
    *,
    key: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    return {
        "key": key or source.key,
        "source": source.redacted,
        "name": name or source.name,
        "kind": kind,
        "size": sum(int(f["size"]) for f in files),
        "sha256": sha256,
        "etag": etag,
        "files": files,
        **(extra or {}),
    }
