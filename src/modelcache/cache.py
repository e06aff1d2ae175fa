"""The cache: one directory per entry, locked downloads, atomic publication, layers, eviction.

Layout of a cache directory (readable by a person)::

    <root>/<key>/meta.json          what the entry is: redacted source, size, sha256, etag, created
    <root>/<key>/<name>             the data, under the source's own file (or directory) name
    <root>/.locks/<key>.lock        held while one process downloads the entry
    <root>/.locks/<key>.use         held shared by every process using the entry (prune skips it)
    <root>/.tmp/                    part files and staging directories, unique to each writer
    <root>/.trusted/                stamps of verified files this cache does not own

A published entry never changes. Writers stream into a part file whose name is unique to the
writer, verify size and sha256, and publish the whole entry with one atomic ``rename``; so the
lock only spares duplicate downloads and correctness never depends on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import config, tree
from .errors import (
    InsufficientSpaceError,
    IntegrityError,
    LockTimeoutError,
    ModelCacheError,
    NotCachedError,
    SourceError,
)
from .sources import Source, SourceLike, parse_sources
from .transfer import (
    FatalError,
    Progress,
    TransferOptions,
    discard_part,
    download,
    read_resume_state,
)

__all__ = ["Cache", "Entry", "Fetched", "Problem"]

log = logging.getLogger("modelcache")

_META = "meta.json"
_FORMAT = 1
_HEX = set("0123456789abcdef")
_SPACE_MARGIN = 16 << 20


@dataclass(frozen=True)
class Entry:
    """One cached model (a file or a directory of files)."""

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


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def hash_file(path: Path) -> str:
    """The sha256 of a file, read in large blocks."""
    hasher = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(8 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def normalize_sha256(value: str | None) -> str | None:
    """Lowercase a hex digest; anything that is not 64 hex characters raises ``ValueError``."""
    if value is None:
        return None
    digest = value.strip().lower()
    if digest.startswith("sha256:"):
        digest = digest[len("sha256:") :]
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError(f"sha256 must be 64 hex characters, got {value!r}")
    return digest


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _unique() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


class Cache:
    """A directory of verified model files, shared safely by threads, processes and hosts.

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

    def _dir(self, name: str) -> Path:
        directory = self.path / name
        directory.mkdir(parents=True, exist_ok=True)
        return directory

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
        No network request is made when a verified entry exists. ``progress(done, total)`` is
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

        ``refresh=True`` downloads a source given without sha256 again even when cached (a
        file that changed at its origin under the same URL) and replaces the entry.
        """
        sources = parse_sources(source, storage_options)
        digest = normalize_sha256(sha256)
        refresh = refresh and digest is None
        for src in sources:
            if not src.is_local and not refresh:
                hit = self._find(src, digest)
                if hit is not None:
                    return hit
        attempts: list[tuple[str, str]] = []
        errors: list[ModelCacheError] = []
        for src in sources:
            try:
                if src.is_local:
                    return self._use_local(src, digest, model)
                if self.offline:
                    raise NotCachedError(
                        "not in the cache and offline mode is on", model=model, source=src.redacted
                    )
                with self._progress_bar(src, progress, progress_bar) as report:
                    if tree.handles(src):  # object stores, the Hub, remote directories
                        return tree.fetch_remote(self, src, digest, report, model, cancel, refresh)
                    return self._download(src, digest, report, model, cancel, refresh)
            except (SourceError, IntegrityError, NotCachedError) as error:
                attempts.append((src.redacted, error.reason))
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        if all(isinstance(e, NotCachedError) for e in errors):
            raise NotCachedError(
                "not in the cache and offline mode is on", model=model, source=sources[0].redacted
            )
        if all(isinstance(e, IntegrityError) for e in errors):
            raise IntegrityError(
                "every mirror sent the wrong bytes", model=model, source=sources[0].redacted
            )
        raise SourceError(
            f"all {len(sources)} sources failed",
            model=model,
            source=sources[0].redacted,
            attempts=attempts,
        )

    def lookup(
        self,
        source: SourceLike | Sequence[SourceLike],
        sha256: str | None = None,
    ) -> Path | None:
        """The cached path for ``source`` if present and verified; never touches the network."""
        digest = normalize_sha256(sha256)
        for src in parse_sources(source):
            if src.is_local:
                if src.local_path.exists():
                    return src.local_path
                continue
            hit = self._find(src, digest)
            if hit is not None:
                return hit.path
        return None

    @staticmethod
    def _key(source: Source, sha256: str | None) -> str:
        return sha256 or source.key

    # -- hits -----------------------------------------------------------------------------------

    def _layers(self) -> list[tuple[Path, bool]]:
        return [(p, True) for p in self.read_only_paths] + [(self.path, False)]

    def _find(self, source: Source, digest: str | None) -> Fetched | None:
        """A verified entry for ``source`` and ``digest``, if the cache has one.

        Besides the entry keyed by the digest, an entry of the same source fetched earlier
        without a digest counts when its bytes have that sha256 (no second copy).
        """
        hit = self._lookup(self._key(source, digest), source)
        if hit is not None or digest is None:
            return hit
        for root, _ in self._layers():
            meta = _read_meta(root / source.key)
            if meta is not None and meta.get("sha256") == digest:
                hit = self._lookup(source.key, source)
                return hit if hit is not None and hit.sha256 == digest else None
        return None

    def _lookup(self, key: str, source: Source) -> Fetched | None:
        for root, read_only in self._layers():
            meta = _read_meta(root / key)
            if meta is None:
                continue
            if not self._trusted(root / key, meta, read_only):
                continue
            entry_dir = root / key
            if not read_only:
                # an entry evicted meanwhile is a miss: the lease is taken, then looked at again
                if not self._lease(key) or not (entry_dir / _META).exists():
                    self.release(key)
                    continue
                with contextlib.suppress(OSError):
                    os.utime(entry_dir / _META)
            return Fetched(
                entry_dir / meta["name"], True, meta["sha256"], meta["size"], source.redacted
            )
        return None

    def _trusted(self, entry_dir: Path, meta: dict[str, Any], read_only: bool) -> bool:
        """Whether the entry's files are the verified ones: by stamp, else by re-hashing."""
        stale = []
        for record in meta["files"]:
            path = entry_dir / record["path"]
            try:
                stamp = _stamp(path)
            except OSError:
                return False
            if stamp == record.get("stamp") or stamp == self._trusted_stamp(path, record["sha256"]):
                continue
            stale.append((record, path, stamp))
        if not stale:
            return True
        for record, path, _ in stale:
            if path.stat().st_size != record["size"] or hash_file(path) != record["sha256"]:
                log.warning(
                    "cache entry %s is corrupt (%s); it will be fetched again",
                    entry_dir,
                    record["path"],
                )
                if not read_only:
                    self._quarantine(entry_dir)
                return False
        for record, path, stamp in stale:
            if read_only:
                self._remember_trust(path, stamp, record["sha256"])
            else:
                record["stamp"] = stamp
        if not read_only:
            _write_meta(entry_dir, meta)
        return True

    def _trust_file(self, path: Path) -> Path:
        digest = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
        return self.path / ".trusted" / f"{digest}.json"

    def _trusted_stamp(self, path: Path, sha256: str) -> list[int] | None:
        """The stamp ``path`` had when it was last found to hash to ``sha256``."""
        try:
            data = json.loads(self._trust_file(path).read_text())
            if data.get("path") != str(path.absolute()) or data.get("sha256") != sha256:
                return None
            return list(data["stamp"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _remember_trust(self, path: Path, stamp: list[int], sha256: str) -> None:
        with contextlib.suppress(OSError):
            target = self._trust_file(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{_unique()}")
            tmp.write_text(
                json.dumps({"path": str(path.absolute()), "stamp": stamp, "sha256": sha256})
            )
            os.replace(tmp, target)

    def _quarantine(self, entry_dir: Path) -> None:
        with contextlib.suppress(OSError):
            trash = self._dir(".trash") / f"{entry_dir.name}.{_unique()}"
            os.rename(entry_dir, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _use_local(self, source: Source, sha256: str | None, model: str | None) -> Fetched:
        path = source.local_path
        if not path.exists():
            raise SourceError("no such file or directory", model=model, source=source.redacted)
        if sha256 is not None and path.is_file():
            stamp = _stamp(path)
            if stamp != self._trusted_stamp(path, sha256):
                actual = hash_file(path)
                if actual != sha256:
                    raise IntegrityError(
                        f"sha256 mismatch: expected {sha256}, the file has {actual}",
                        model=model,
                        source=source.redacted,
                    )
                self._remember_trust(path, stamp, actual)
        size = path.stat().st_size if path.is_file() else None
        return Fetched(path, True, sha256, size, source.redacted)

    # -- downloads ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _progress_bar(
        self, source: Source, progress: Progress | None, enabled: bool | None
    ) -> Iterator[Progress]:
        if enabled is None:
            enabled = config.progress_enabled(sys.stderr.isatty())
        if not enabled:
            yield progress or (lambda done, total: None)
            return
        from tqdm.auto import tqdm

        bar = tqdm(
            total=None,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=source.name,
            leave=False,
            disable=False,
        )

        def report(done: int, total: int | None) -> None:
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)
            if progress is not None:
                progress(done, total)

        try:
            yield report
        finally:
            if bar.total is not None and bar.n >= bar.total:
                bar.refresh()  # draw the finished bar once before it is cleared
            bar.close()

    def _download(
        self,
        source: Source,
        sha256: str | None,
        progress: Progress,
        model: str | None,
        cancel: threading.Event | None,
        refresh: bool = False,
    ) -> Fetched:
        key = self._key(source, sha256)
        lock, hit = self._lock_entry(key, source, model, refresh, cancel)
        if hit is not None:
            return hit
        try:
            hit = None if refresh else self._lookup(key, source)
            if hit is not None:
                return hit
            part = self._claim_part(self.path / ".tmp", key)
            log.info("downloading %s into %s", source.redacted, self.path / key)
            started = time.monotonic()
            result = self._transfer(source, part, progress, model, cancel)
            if sha256 is not None and result.sha256 != sha256:
                discard_part(part)
                raise IntegrityError(
                    f"sha256 mismatch: expected {sha256}, got {result.sha256}; nothing was cached",
                    model=model,
                    source=source.redacted,
                )
            elapsed = time.monotonic() - started
            log.info(
                "downloaded %s (%d bytes, %d fetched) in %.2fs",
                source.redacted,
                result.size,
                result.fetched,
                elapsed,
            )
            files = [{"path": source.name, "size": result.size, "sha256": result.sha256}]
            return self._publish(
                key, source, {source.name: part}, files, result.etag, "file", replace=refresh
            )
        finally:
            lock.release()

    def _transfer(
        self,
        source: Source,
        part: Path,
        progress: Progress,
        model: str | None,
        cancel: threading.Event | None,
    ) -> Any:
        from .readers import open_reader

        def check_space(total: int, already: int) -> None:
            free = shutil.disk_usage(part.parent).free
            if total - already + _SPACE_MARGIN > free:
                raise InsufficientSpaceError(
                    f"needs {total - already} more bytes but {part.parent} has {free} free",
                    model=model,
                    source=source.redacted,
                )

        try:
            reader = open_reader(source, self.transfer)
        except FatalError as error:
            raise SourceError(
                source.scrub(str(error)), model=model, source=source.redacted, status=error.status
            ) from None
        try:
            return download(
                reader,
                part,
                options=self.transfer,
                progress=progress,
                on_size=check_space,
                cancel=cancel,
            )
        except FatalError as error:
            raise SourceError(
                source.scrub(str(error)), model=model, source=source.redacted, status=error.status
            ) from None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise InsufficientSpaceError(
                    f"the disk filled up: {error}", model=model, source=source.redacted
                ) from None
            raise
        finally:
            reader.close()

    def _lock_entry(
        self,
        key: str,
        source: Source,
        model: str | None,
        refresh: bool = False,
        cancel: threading.Event | None = None,
    ) -> tuple[Any, Fetched | None]:
        """Take the entry's write lock: ``(lock, None)``, the caller releases it; or
        ``(lock, hit)`` when another writer published the entry meanwhile (lock not held).
        """
        from filelock import FileLock

        try:
            lock = FileLock(str(self._dir(".locks") / f"{key}.lock"))
            self._dir(".tmp")
        except OSError as error:
            raise ModelCacheError(
                f"cannot write the cache at {self.path}: {error}",
                model=model,
                source=source.redacted,
            ) from None
        return lock, self._wait_for_lock(lock, key, source, model, refresh, cancel=cancel)

    def _wait_for_lock(
        self,
        lock: Any,
        key: str,
        source: Source,
        model: str | None,
        refresh: bool = False,
        *,
        cancel: threading.Event | None = None,
    ) -> Fetched | None:
        """Take the entry's lock, or return the entry if another writer publishes it meanwhile.

        Waiting lasts as long as the other writer makes progress; ``lock_timeout`` seconds
        without any raise :class:`LockTimeoutError`.
        """
        from filelock import Timeout

        last_seen: float | None = None
        last_change = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=0.2)
                return None
            except Timeout:
                pass
            if cancel is not None and cancel.is_set():
                reason = "cancelled while waiting for another writer"
                raise SourceError(reason, model=model, source=source.redacted)
            hit = None if refresh else self._lookup(key, source)
            if hit is not None:
                return hit
            activity = self._writer_activity(key)
            if activity != last_seen:
                last_seen, last_change = activity, time.monotonic()
            elif time.monotonic() - last_change > self.lock_timeout:
                raise LockTimeoutError(
                    f"another process holds the lock on {key[:16]} and made no progress "
                    f"for {self.lock_timeout:.0f}s (lock file {lock.lock_file})",
                    model=model,
                    source=source.redacted,
                )

    def _writer_activity(self, key: str) -> float:
        latest = 0.0
        for path in (self.path / ".tmp").glob(f"{key}.*"):
            with contextlib.suppress(OSError):
                st = path.stat()
                latest = max(latest, st.st_mtime + st.st_size)
        return latest

    def _claim_part(self, tmp: Path, key: str) -> Path:
        """A part file unique to this writer, taking over the best one a dead writer left."""
        mine = tmp / f"{key}.{_unique()}.part"
        candidates = sorted(
            tmp.glob(f"{key}.*.part"), key=lambda p: read_resume_state(p)[0], reverse=True
        )
        for candidate in candidates:
            if read_resume_state(candidate)[0] <= 0 or _part_in_use(candidate):
                continue
            try:
                os.rename(candidate, mine)
            except OSError:
                continue  # another writer took it
            state = candidate.with_name(candidate.name + ".json")
            with contextlib.suppress(OSError):
                os.rename(state, mine.with_name(mine.name + ".json"))
            log.info("resuming %s from byte %d", key[:16], read_resume_state(mine)[0])
            break
        for stale in tmp.glob(f"{key}.*"):
            if stale.name.startswith(mine.name):
                continue
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink()
        return mine

    def _publish(
        self,
        key: str,
        source: Source,
        parts: Mapping[str, Path],
        files: list[dict[str, Any]],
        etag: str | None,
        kind: str,
        *,
        replace: bool = False,
        extra: Mapping[str, Any] | None = None,
        sha256: str | None = None,
    ) -> Fetched:
        """Move finished parts into a staging directory, write metadata, rename it into place.

        ``extra``: more metadata fields (a Hub revision); ``sha256``: the entry's digest when
        the caller computed it (a directory's manifest digest, see ``tree.py``).
        """
        staging = self._dir(".tmp") / f"{key}.{_unique()}.d"
        staging.mkdir()
        for relative, part in parts.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(part, 0o664)
            os.rename(part, target)
            discard_part(part)
        for record in files:
            record["stamp"] = _stamp(staging / record["path"])
        total = sum(record["size"] for record in files)
        digest = sha256 or (files[0]["sha256"] if kind == "file" else _manifest_digest(files))
        name = source.name
        meta = {
            "format": _FORMAT,
            "key": key,
            "source": source.redacted,
            "name": name,
            "kind": kind,
            "size": total,
            "sha256": digest,
            "etag": etag,
            "created": _now_iso(),
            "files": files,
            **(extra or {}),
        }
        _write_meta(staging, meta)
        final = self.path / key
        if final.exists() and (replace or _read_meta(final) is None):
            self._quarantine(final)  # a broken leftover, not a published entry
        try:
            os.rename(staging, final)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another writer published first
            hit = self._lookup(key, source)
            if hit is None:
                raise
            return hit
        self._lease(key)
        return Fetched(final / name, False, digest, total, source.redacted)

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
        hit = self._lookup(key, source)
        if hit is not None:
            return hit
        lock, hit = self._lock_entry(key, source, model)
        if hit is not None:
            return hit
        try:
            hit = self._lookup(key, source)
            if hit is not None:
                return hit
            part = self._dir(".tmp") / f"{key}.{_unique()}.part"
            try:
                produce(part)
                files = [
                    {"path": source.name, "size": part.stat().st_size, "sha256": hash_file(part)}
                ]
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            return self._publish(key, source, {source.name: part}, files, None, "file")
        finally:
            lock.release()

    # -- in-use leases ------------------------------------------------------------------------

    _leases: dict[str, int] = {}
    _leases_lock = threading.Lock()

    def _lease(self, key: str) -> bool:
        """Mark the entry as used by this process (shared lock, held until :meth:`release`).

        False when the entry is being evicted right now; True otherwise (also when the cache
        directory cannot hold lock files, where eviction cannot be coordinated anyway).
        """
        lease_path = str(self.path / ".locks" / f"{key}.use")
        with Cache._leases_lock:
            if lease_path in Cache._leases:
                return True
            try:
                fd = os.open(lease_path, os.O_RDWR | os.O_CREAT, 0o664)
            except OSError:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            Cache._leases[lease_path] = fd
            return True

    def release(self, key: str) -> None:
        """Let :meth:`prune` evict the entry again (this process no longer uses it)."""
        lease_path = str(self.path / ".locks" / f"{key}.use")
        with Cache._leases_lock:
            fd = Cache._leases.pop(lease_path, None)
        if fd is not None:
            os.close(fd)

    # -- listing, verifying, removing ---------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every entry, the read-only layers' first, each layer sorted by key."""
        found: list[Entry] = []
        for root, read_only in self._layers():
            if not root.is_dir():
                continue
            for entry_dir in sorted(root.iterdir()):
                if entry_dir.name.startswith("."):
                    continue
                meta = _read_meta(entry_dir)
                if meta is not None:
                    found.append(_entry(entry_dir, meta, read_only))
        return found

    def verify_entries(self) -> list[Problem]:
        """Re-hash every file of every entry; the problems found (empty when all is well)."""
        problems: list[Problem] = []
        for root, read_only in self._layers():
            if not root.is_dir():
                continue
            for entry_dir in sorted(root.iterdir()):
                if entry_dir.name.startswith(".") or not entry_dir.is_dir():
                    continue
                meta = _read_meta(entry_dir)
                if meta is None:
                    problems.append(Problem(entry_dir.name, "metadata missing or unreadable"))
                    continue
                for record in meta["files"]:
                    path = entry_dir / record["path"]
                    if not path.is_file():
                        problems.append(Problem(meta["key"], f"{record['path']} is missing"))
                    elif path.stat().st_size != record["size"]:
                        problems.append(
                            Problem(
                                meta["key"],
                                f"{record['path']} has {path.stat().st_size} bytes, "
                                f"expected {record['size']}",
                            )
                        )
                    elif hash_file(path) != record["sha256"]:
                        problems.append(Problem(meta["key"], f"{record['path']} sha256 mismatch"))
                    elif read_only:
                        self._remember_trust(path, _stamp(path), record["sha256"])
                    else:
                        record["stamp"] = _stamp(path)
                if not read_only and not any(p.key == meta["key"] for p in problems):
                    with contextlib.suppress(OSError):
                        used = (entry_dir / _META).stat()  # re-hashing is not a use (LRU)
                        _write_meta(entry_dir, meta)
                        os.utime(entry_dir / _META, ns=(used.st_atime_ns, used.st_mtime_ns))
        return problems

    def verify(self) -> list[str]:
        """Re-hash every entry; one line per problem found (empty when all is well)."""
        return [str(problem) for problem in self.verify_entries()]

    def _resolve_key(self, key: str) -> str:
        keys = [e.key for e in self.entries() if not e.read_only and e.key.startswith(key)]
        if not key or not keys:
            raise KeyError(f"no entry {key!r} in {self.path}")
        if len(set(keys)) > 1:
            raise KeyError(f"{key!r} matches {len(keys)} entries; give more of the key")
        return keys[0]

    def remove(self, key: str) -> None:
        """Delete one entry (a unique prefix of its key will do).

        Raises ``KeyError`` when no entry matches and :class:`ModelCacheError` when a process
        is using or writing it.
        """
        full = self._resolve_key(key)
        if not self._evict(full):
            raise ModelCacheError(f"entry {full[:16]} is in use by a running process")

    def prune(self, max_bytes: int) -> list[Entry]:
        """Evict least recently used entries until the cache holds at most ``max_bytes``.

        Entries that a running process uses or writes are never evicted. Returns the evicted.
        """
        entries = sorted((e for e in self.entries() if not e.read_only), key=lambda e: e.last_used)
        total = sum(e.size for e in entries)
        evicted = []
        for entry in entries:
            if total <= max_bytes:
                break
            if self._evict(entry.key):
                total -= entry.size
                evicted.append(entry)
        return evicted

    def _evict(self, key: str) -> bool:
        from filelock import FileLock, Timeout

        locks = self._dir(".locks")
        lock = FileLock(str(locks / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            fd = os.open(locks / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o664)
            try:
                if str(locks / f"{key}.use") in Cache._leases:
                    return False
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return False
                trash = self._dir(".trash") / f"{key}.{_unique()}"
                try:
                    os.rename(self.path / key, trash)
                except FileNotFoundError:
                    return False
                shutil.rmtree(trash, ignore_errors=True)
                log.info("evicted %s", key[:16])
                return True
            finally:
                os.close(fd)
        finally:
            lock.release()


def _part_in_use(part: Path) -> bool:
    """Whether a living writer still holds ``part`` (it keeps an exclusive flock on it)."""
    try:
        fd = os.open(part, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def _manifest_digest(files: list[dict[str, Any]]) -> str:
    lines = "".join(f"{r['sha256']}  {r['path']}\n" for r in sorted(files, key=lambda r: r["path"]))
    return hashlib.sha256(lines.encode()).hexdigest()


def _read_meta(entry_dir: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((entry_dir / _META).read_text())
    except (OSError, ValueError):
        return None
    required = ("key", "name", "size", "sha256", "files")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        return None
    return meta


def _write_meta(entry_dir: Path, meta: Mapping[str, Any]) -> None:
    tmp = entry_dir / f".{_META}.{_unique()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.chmod(tmp, 0o664)
    os.replace(tmp, entry_dir / _META)


def _entry(entry_dir: Path, meta: Mapping[str, Any], read_only: bool) -> Entry:
    last_used = (entry_dir / _META).stat().st_mtime
    try:
        created = datetime.fromisoformat(meta.get("created", "")).timestamp()
    except ValueError:
        created = last_used
    return Entry(
        key=meta["key"],
        source=meta.get("source", ""),
        path=entry_dir / meta["name"],
        size=int(meta["size"]),
        sha256=meta["sha256"],
        last_used=last_used,
        created=created,
        etag=meta.get("etag"),
        kind=meta.get("kind", "file"),
        read_only=read_only,
    )
