"""Remote entries from object stores and the Hub: one file, or every file under a directory.

A source is first *planned* (the store is asked what it names: sizes, validators, the digests
it vouches for, the commit a branch points at), then every file is fetched by the transfer
engine into its own part file (several files at once, each resumable on its own), checked,
and the whole entry published with one atomic rename. So a directory is never half there, and
an interrupted fetch resumes file by file.

The sha256 of a directory entry is the sha256 of its manifest: one line
``"<sha256 of the file>  <path relative to the directory>\\n"`` per file, sorted by path
(``sha256sum``'s output format).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fnmatch
import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .errors import InsufficientSpaceError, IntegrityError, NotCachedError, SourceError
from .sources import Source
from .transfer import (
    FatalError,
    Progress,
    Reader,
    TransferOptions,
    TransferResult,
    discard_part,
    download,
    read_resume_state,
)

if TYPE_CHECKING:
    from .cache import Cache, Fetched

__all__ = [
    "FILES_AT_ONCE",
    "Plan",
    "RemoteFile",
    "Selection",
    "fetch_remote",
    "handles",
    "manifest_digest",
]

log = logging.getLogger("modelcache")

#: files of one directory entry fetched at the same time
FILES_AT_ONCE = 4
_SPACE_MARGIN = 16 << 20
_STORE_PROTOCOLS = {"s3", "gs", "hf"}


def handles(source: Source) -> bool:
    """Whether ``source`` is fetched here: object stores, the Hub, and remote directories."""
    if source.protocol in _STORE_PROTOCOLS:
        return True
    return (
        not source.is_local
        and source.protocol not in ("http", "https")
        and source.url.split("?", 1)[0].endswith("/")
    )


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
        size: bytes, when the store said.
        open_reader: makes a :class:`Reader` for the file with the given transfer options.
        sha256: the digest the store vouches for (Hub LFS files, mirrored objects), checked.
        git_oid: the git blob id the Hub gives for a small (non-LFS) file, checked.
    """

    path: str
    size: int | None
    open_reader: Callable[[TransferOptions], Reader]
    sha256: str | None = None
    git_oid: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a source names: ``kind`` ``"file"`` or ``"directory"``, its files, and metadata."""

    kind: str
    files: list[RemoteFile]
    etag: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    transfer: TransferOptions = field(default_factory=TransferOptions)


def manifest_digest(records: list[tuple[str, str]]) -> str:
    """The sha256 of a directory from ``(relative path, sha256)`` pairs (see the module doc)."""
    lines = "".join(f"{digest}  {path}\n" for path, digest in sorted(records))
    return hashlib.sha256(lines.encode()).hexdigest()


def _plan(source: Source, options: TransferOptions) -> Plan:
    if source.protocol == "hf":
        from .hub import plan_hub

        return plan_hub(source, options)
    from .stores import plan_store

    return plan_store(source, options)


def fetch_remote(
    cache: Cache,
    source: Source,
    sha256: str | None,
    progress: Progress,
    model: str | None,
    cancel: threading.Event | None,
    refresh: bool = False,
) -> Fetched:
    """Download what ``source`` names into ``cache`` as one entry (see the module doc)."""
    key = cache._key(source, sha256)
    lock, hit = cache._lock_entry(key, source, model, refresh, cancel)
    if hit is not None:
        return hit
    try:
        hit = None if refresh else cache._lookup(key, source)
        if hit is not None:
            return hit
        started = time.monotonic()
        try:
            plan = _plan(source, cache.transfer)
        except FatalError as error:
            raise SourceError(
                source.scrub(str(error)), model=model, source=source.redacted, status=error.status
            ) from None
        except NotCachedError as error:
            raise error.with_model(model) from None
        declared = plan.files[0].sha256 if plan.kind == "file" else None
        if sha256 is not None and declared is not None and declared != sha256:
            raise IntegrityError(
                f"sha256 mismatch: expected {sha256}, the store says {declared}; nothing was "
                "downloaded",
                model=model,
                source=source.redacted,
            )
        job = _TreeJob(cache, source, key, plan, progress, model, cancel)
        done = job.run()
        return _publish(cache, source, key, plan, done, sha256, model, refresh, started)
    finally:
        lock.release()


def _publish(
    cache: Cache,
    source: Source,
    key: str,
    plan: Plan,
    done: list[tuple[RemoteFile, Path, TransferResult]],
    sha256: str | None,
    model: str | None,
    refresh: bool,
    started: float,
) -> Fetched:
    name = source.name
    if plan.kind == "file":
        _, part, result = done[0]
        digest = result.sha256
        parts = {name: part}
        files = [{"path": name, "size": result.size, "sha256": result.sha256}]
    else:
        digest = manifest_digest([(f.path, r.sha256) for f, _, r in done])
        parts = {f"{name}/{f.path}": p for f, p, _ in done}
        files = [
            {"path": f"{name}/{f.path}", "size": r.size, "sha256": r.sha256} for f, _, r in done
        ]
    if sha256 is not None and digest != sha256:
        for _, part, _ in done:
            discard_part(part)
        raise IntegrityError(
            f"sha256 mismatch: expected {sha256}, got {digest}; nothing was cached",
            model=model,
            source=source.redacted,
        )
    total = sum(r.size for _, _, r in done)
    fetched = sum(r.fetched for _, _, r in done)
    log.info(
        "downloaded %s (%d files, %d bytes, %d fetched) in %.2fs",
        source.redacted,
        len(done),
        total,
        fetched,
        time.monotonic() - started,
    )
    return cache._publish(
        key,
        source,
        parts,
        files,
        plan.etag,
        plan.kind,
        replace=refresh,
        extra=plan.meta,
        sha256=digest,
    )


def _file_id(relative: str) -> str:
    return hashlib.sha256(relative.encode()).hexdigest()[:16]


class _TreeJob:
    """Fetches a plan's files, several at once, each into its own resumable part file."""

    def __init__(
        self,
        cache: Cache,
        source: Source,
        key: str,
        plan: Plan,
        progress: Progress,
        model: str | None,
        cancel: threading.Event | None,
    ) -> None:
        self.cache = cache
        self.source = source
        self.key = key
        self.plan = plan
        self.progress = progress
        self.model = model
        self.user_cancel = cancel
        self.stop = threading.Event()
        at_once = min(len(plan.files), FILES_AT_ONCE)
        self.at_once = at_once
        self.per_file = dataclasses.replace(
            plan.transfer, connections=max(1, plan.transfer.connections // at_once)
        )
        self.tmp = cache._dir(".tmp")
        self._done: dict[int, int] = {}
        self._lock = threading.Lock()
        sizes = [f.size for f in plan.files]
        self.total = sum(s for s in sizes if s is not None) if None not in sizes else None

    def run(self) -> list[tuple[RemoteFile, Path, TransferResult]]:
        self._check_space()
        results: dict[int, tuple[Path, TransferResult]] = {}
        errors: list[BaseException] = []
        with concurrent.futures.ThreadPoolExecutor(
            self.at_once, thread_name_prefix="modelcache-file"
        ) as pool:
            futures = {pool.submit(self._one, i, f): i for i, f in enumerate(self.plan.files)}
            pending = set(futures)
            while pending:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=0.2, return_when=concurrent.futures.FIRST_EXCEPTION
                )
                if self.user_cancel is not None and self.user_cancel.is_set():
                    self.stop.set()
                for future in finished:
                    error = future.exception()
                    if error is None:
                        results[futures[future]] = future.result()
                    else:
                        errors.append(error)
                        self.stop.set()  # one file failed: the others stop (their parts stay)
        if errors:  # the first real failure, not the cancellations it caused
            raise next((e for e in errors if not _is_cancel(e)), errors[0])
        if len(results) < len(self.plan.files):
            raise SourceError("cancelled", model=self.model, source=self.source.redacted)
        return [(self.plan.files[i], *results[i]) for i in range(len(self.plan.files))]

    def _check_space(self) -> None:
        if self.total is None:
            return
        already = 0
        for part in self.tmp.glob(f"{self.key}.*.part"):
            already += read_resume_state(part)[0]
        free = shutil.disk_usage(self.tmp).free
        if self.total - already + _SPACE_MARGIN > free:
            raise InsufficientSpaceError(
                f"needs {self.total - already} more bytes but {self.tmp} has {free} free",
                model=self.model,
                source=self.source.redacted,
            )

    def _report(self, index: int, done: int) -> None:
        with self._lock:
            self._done[index] = done
            total_done = sum(self._done.values())
        self.progress(total_done, self.total)

    def _label(self, file: RemoteFile) -> str:
        return f"{file.path}: " if file.path else ""

    def _one(self, index: int, file: RemoteFile) -> tuple[Path, TransferResult]:
        part = self.cache._claim_part(self.tmp, f"{self.key}.{_file_id(file.path)}")
        label = self._label(file)
        try:
            reader = file.open_reader(self.per_file)
        except FatalError as error:
            raise self._source_error(label, error) from None
        try:
            result = download(
                reader,
                part,
                options=self.per_file,
                progress=lambda done, _total: self._report(index, done),
                cancel=self.stop,
            )
        except FatalError as error:
            raise self._source_error(label, error) from None
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise InsufficientSpaceError(
                    f"the disk filled up: {error}", model=self.model, source=self.source.redacted
                ) from None
            raise
        finally:
            with contextlib.suppress(Exception):
                reader.close()
        self._verify(file, part, result, getattr(reader, "declared_sha256", None), label)
        return part, result

    def _source_error(self, label: str, error: FatalError) -> SourceError:
        return SourceError(
            self.source.scrub(f"{label}{error}"),
            model=self.model,
            source=self.source.redacted,
            status=error.status,
        )

    def _verify(
        self,
        file: RemoteFile,
        part: Path,
        result: TransferResult,
        declared: str | None,
        label: str,
    ) -> None:
        problem = None
        expected = file.sha256 or declared
        if file.size is not None and result.size != file.size:
            problem = f"{label}size mismatch: the store lists {file.size} bytes, got {result.size}"
        elif expected is not None and result.sha256 != expected:
            problem = f"{label}sha256 mismatch: the store says {expected}, got {result.sha256}"
        elif file.git_oid is not None and _git_blob_id(part, result.size) != file.git_oid:
            problem = f"{label}git blob id mismatch: the Hub says {file.git_oid}"
        if problem is not None:
            discard_part(part)
            raise IntegrityError(
                f"{problem}; nothing was cached", model=self.model, source=self.source.redacted
            )


def _is_cancel(error: BaseException) -> bool:
    return isinstance(error, SourceError) and error.reason.endswith("cancelled")


def _git_blob_id(path: Path, size: int) -> str:
    """The git object id of a file's content (``git hash-object``)."""
    hasher = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    for block in _blocks(path):
        hasher.update(block)
    return hasher.hexdigest()


def _blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(8 << 20):
            yield block
