"""The :class:`Cache` façade: find a source's copy in the layers, or fetch it once and publish it.

One path for every remote source: find a ref -> take the ref's write lock -> plan (what files,
sizes, digests) -> fetch the files not already stored into part files -> verify -> publish
blobs and the ref. Models and sources are named on errors here, at the boundary, once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from modelcache import _config as config
from modelcache._hashing import hash_file, normalize_sha256
from modelcache._sources import Source, SourceLike, parse_sources
from modelcache._transfer import FatalError, Progress, TransferOptions
from modelcache.errors import (
    IntegrityError,
    ModelCacheError,
    NotCachedError,
    SourceError,
)

from . import _upkeep, _write
from ._entries import Entry, Fetched, Problem
from ._progress import progress_bar
from ._store import Store

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

    _leases = Store.leases  # one per process: leases are per process, not per Cache object

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

    def _store(self) -> Store:
        return Store(self.path, self.read_only_paths, self._checked)

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
        store = self._store()
        recorded: dict[str, str] = {}  # source key -> the other sha256 its entry has
        hit = None if refresh else _cached(store, sources, digest, recorded)
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
                        return _write.download(
                            store,
                            src,
                            digest,
                            report,
                            cancel,
                            replace=replace,
                            transfer=self.transfer,
                            lock_timeout=self.lock_timeout,
                        )
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
        """The cached path for ``source`` if present and verified; never touches the network.

        As :meth:`fetch` would: a remote source's entry first, then a local path that exists."""
        sources = parse_sources(source)
        hit = _cached(self._store(), sources, normalize_sha256(sha256), {})
        if hit is not None:
            return hit.path
        return next((s.local_path for s in sources if s.is_local and s.local_path.exists()), None)

    def _use_local(self, source: Source, sha256: str | None) -> Fetched:
        path = source.local_path
        if not path.exists():
            raise SourceError("no such file or directory")
        is_file = path.is_file()
        trust = self._store().trust
        if sha256 is not None and is_file and not trust.holds(path, None, sha256, reseal=False):
            actual = hash_file(path)
            raise IntegrityError(f"sha256 mismatch: expected {sha256}, the file has {actual}")
        size = path.stat().st_size if is_file else None
        return Fetched(path, True, sha256, size, source.redacted)

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
            return _write.derive(
                self._store(), key, source, produce, lock_timeout=self.lock_timeout
            )
        except ModelCacheError as error:
            raise error.about(model=model, source=source.redacted) from None

    def release(self, key: str) -> None:
        """Let :meth:`prune` evict the entry again (this process no longer uses it)."""
        self._store().release(key)

    # -- listing, verifying, removing ---------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every entry, one per source fetched: the read-only layers' first, each sorted by key."""
        return [Entry.of(ref, layer.read_only) for layer, ref in self._store().all_refs()]

    def verify_entries(self) -> list[Problem]:
        """Re-hash every stored file (each blob once); the problems found (empty when all is well).

        Found sound, a file is trusted again without re-hashing on the next use; a corrupt one
        is reported, not removed (``modelcache rm`` removes it).
        """
        return _upkeep.verify(self._store())

    def verify(self) -> list[str]:
        """Re-hash every entry; one line per problem found (empty when all is well)."""
        return [str(problem) for problem in self.verify_entries()]

    def entry(self, key: str) -> Entry:
        """The writable cache's entry whose key or sha256 starts with ``key``.

        Raises ``KeyError`` (with a message for people) when none or several match.
        """
        return _upkeep.find_entry(self.entries(), key, self.path)

    def remove(self, key: str) -> None:
        """Delete one entry (a unique prefix of its key or sha256 will do), and the blobs only
        it named.

        Raises ``KeyError`` when no entry matches and :class:`ModelCacheError` when a process
        is using or writing it.
        """
        full = self.entry(key).key
        store = self._store()
        if not _upkeep.evict(store, full):
            raise ModelCacheError(f"entry {full[:16]} is in use by a running process")
        store.writable().collect_garbage()

    def prune(self, max_bytes: int) -> list[Entry]:
        """Evict least recently used entries until the cache's blobs take at most ``max_bytes``
        (a blob that several entries share counts once).

        Entries that a running process uses or writes are never evicted. Returns the evicted.
        """
        return _upkeep.prune(self._store(), max_bytes)

    def clear(self) -> int:
        """Delete everything in the writable cache directory, whatever its layout version;
        the number of entries removed. Nothing else may be using the cache meanwhile."""
        removed = _upkeep.clear(self.path)
        self._checked.clear()
        return removed


def _cached(
    store: Store, sources: list[Source], digest: str | None, recorded: dict[str, str]
) -> Fetched | None:
    """The entry of the first remote source in ``sources`` that the store holds; else, with a
    ``digest`` whose blob is stored, a new entry for the first remote source made from it."""
    remote = [s for s in sources if not s.is_local]
    for src in remote:
        hit = store.find(src, digest, recorded)
        if hit is not None:
            return hit
    if digest is not None and remote:
        return store.from_blob(remote[0], digest)
    return None
