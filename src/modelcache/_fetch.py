"""Fetch every file of a plan into part files, several at once, and check what the plan promised.

Knows no cache: the caller says where each file's part goes (``claim``), and gets back, per
file, the part and what the transfer engine measured (size, sha256, bytes fetched). Each file
resumes on its own; when one fails the others stop and keep their parts for the next attempt.

Errors carry no model or source (the cache attaches both at its boundary): a refusal of the
origin is the engine's :class:`FatalError`, prefixed with the file's path in a directory.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ._disk import ensure_free, is_disk_full
from ._hashing import git_blob_id
from ._plan import Plan, RemoteFile
from ._transfer import (
    FatalError,
    Progress,
    TransferResult,
    discard_part,
    download,
    resume_progress,
)
from .errors import InsufficientSpaceError, IntegrityError, SourceError

__all__ = ["FILES_AT_ONCE", "FetchedFile", "fetch_plan"]

FILES_AT_ONCE = 4
"""Files of one plan fetched at the same time."""


@dataclass(frozen=True)
class FetchedFile:
    """One file of a plan, fetched and checked: its part file and the engine's result."""

    file: RemoteFile
    part: Path
    result: TransferResult


def fetch_plan(
    plan: Plan,
    claim: Callable[[RemoteFile], Path],
    *,
    progress: Progress,
    cancel: threading.Event | None = None,
) -> list[FetchedFile]:
    """Fetch ``plan``'s files into the parts ``claim(file)`` gives, in the plan's order.

    Raises :class:`FatalError` (the origin refused), :class:`IntegrityError` (a file is not
    what the plan said), :class:`InsufficientSpaceError`, or :class:`SourceError` when
    cancelled. Parts of files that failed their checks are removed; the others stay.
    """
    if not plan.files:
        return []
    return _Job(plan, claim, progress, cancel).run()


class _Job:
    def __init__(
        self,
        plan: Plan,
        claim: Callable[[RemoteFile], Path],
        progress: Progress,
        cancel: threading.Event | None,
    ) -> None:
        self.plan = plan
        self.parts = [claim(file) for file in plan.files]
        self.progress = progress
        self.user_cancel = cancel
        self.stop = threading.Event()
        self.at_once = min(len(plan.files), FILES_AT_ONCE)
        self.per_file = dataclasses.replace(
            plan.transfer, connections=max(1, plan.transfer.connections // self.at_once)
        )
        self._lock = threading.Lock()
        self._done = [0] * len(plan.files)
        self._totals: list[int | None] = [file.size for file in plan.files]

    def run(self) -> list[FetchedFile]:
        directory = self.parts[0].parent
        sizes = [f.size for f in self.plan.files]
        if None not in sizes:
            already = sum(resume_progress(part) for part in self.parts)
            try:
                ensure_free(directory, sum(s or 0 for s in sizes) - already)
            except InsufficientSpaceError:
                for part in self.parts:
                    _drop_if_empty(part)
                raise
        results: dict[int, FetchedFile] = {}
        errors: list[BaseException] = []
        changed = threading.Condition()  # a thread ended
        indexes = iter(range(len(self.plan.files)))
        running = self.at_once  # threads not ended yet

        def work() -> None:
            nonlocal running
            try:
                while not self.stop.is_set():
                    with changed:
                        index = next(indexes, None)
                    if index is None:
                        return
                    try:
                        fetched = self._one(index)
                    except BaseException as error:
                        with changed:
                            errors.append(error)
                        self.stop.set()  # one file failed: the others stop (parts stay)
                        return
                    with changed:
                        results[index] = fetched
            finally:
                with changed:
                    running -= 1
                    changed.notify()

        # daemon threads, not a ThreadPoolExecutor (whose threads the interpreter joins at
        # exit): a process that ends while a background handle downloads ends now, its parts
        # kept for the next run, rather than when the download is done
        threads = [
            threading.Thread(target=work, name=f"modelcache-file_{n}", daemon=True)
            for n in range(self.at_once)
        ]
        for thread in threads:
            thread.start()
        try:
            with changed:
                while running:
                    changed.wait(0.2)
                    if self.user_cancel is not None and self.user_cancel.is_set():
                        self.stop.set()
        except BaseException:
            # Ctrl-C in this thread: the downloads stop now (their parts stay), rather than
            # run to their end
            self.stop.set()
            raise
        finally:
            for thread in threads:
                thread.join()
        if errors:  # the first real failure, not the cancellations it caused
            raise next((e for e in errors if not _is_cancel(e)), errors[0])
        if len(results) < len(self.plan.files):
            raise SourceError("cancelled")
        return [results[i] for i in range(len(self.plan.files))]

    def _report(self, index: int, done: int, total: int | None) -> None:
        with self._lock:
            self._done[index] = done
            if total is not None:
                self._totals[index] = total
            totals = self._totals
            total_all = None if None in totals else sum(t or 0 for t in totals)
            done_all = sum(self._done)
        self.progress(done_all, total_all)

    def _one(self, index: int) -> FetchedFile:
        file, part = self.plan.files[index], self.parts[index]
        label = f"{file.path}: " if file.path else ""

        def on_size(total: int, already: int) -> None:
            if file.size is None:
                ensure_free(part.parent, total - already)

        try:
            reader = file.open_reader(self.per_file)
        except FatalError as error:
            raise FatalError(f"{label}{error}", error.status) from None
        try:
            result = download(
                reader,
                part,
                options=self.per_file,
                progress=lambda done, total: self._report(index, done, total),
                on_size=on_size,
                cancel=self.stop,
            )
        except FatalError as error:
            raise FatalError(f"{label}{error}", error.status) from None
        except InsufficientSpaceError:
            _drop_if_empty(part)  # refused once the size was known: keep what an earlier run got
            raise
        except OSError as error:
            if is_disk_full(error):
                discard_part(part)
                raise InsufficientSpaceError(f"{label}the disk filled up: {error}") from None
            raise
        finally:
            reader.close()
        _check(file, part, result, getattr(reader, "declared_sha256", None), label)
        return FetchedFile(file, part, result)


def _check(
    file: RemoteFile, part: Path, result: TransferResult, declared: str | None, label: str
) -> None:
    """Whether the file is what the plan (or the reader, once it saw the response) promised."""
    problem = None
    expected = file.sha256 or declared
    if file.size is not None and result.size != file.size:
        problem = f"size mismatch: the store lists {file.size} bytes, got {result.size}"
    elif expected is not None and result.sha256 != expected:
        problem = f"sha256 mismatch: the store says {expected}, got {result.sha256}"
    elif file.git_oid is not None and git_blob_id(part) != file.git_oid:
        problem = f"git blob id mismatch: the Hub says {file.git_oid}"
    if problem is not None:
        discard_part(part)
        raise IntegrityError(f"{label}{problem}; nothing was cached")


def _drop_if_empty(part: Path) -> None:
    """Remove a part file (and its range map) that holds no byte yet: refused for want of
    space, it would only be left behind."""
    if resume_progress(part) <= 0:
        discard_part(part)


def _is_cancel(error: BaseException) -> bool:
    return isinstance(error, SourceError) and error.reason.endswith("cancelled")
