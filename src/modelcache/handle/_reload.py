"""``reload()``: the same pipeline run beside the serving model, swapped in once it is READY."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from modelcache._sources import Source
from modelcache.errors import ModelCacheError, shorten

from ._pipeline import Loaded, LoadRun
from ._status import Progress, ReloadState, ReloadStatus

__all__ = ["ReloadJob"]

log = logging.getLogger("modelcache")


@dataclass
class ReloadJob:
    """One reload: loads beside the serving model, reported under ``status()["reload"]``.

    Its thread runs a :class:`LoadRun` and hands the result to ``swap``, which installs it
    unless the job was cancelled (superseded by a newer reload, or the handle unloaded).
    """

    name: str
    sources: list[Source]
    sha256: str | None
    refresh: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    state: ReloadState = "fetching"
    error: str | None = None
    progress: Progress = field(default_factory=Progress)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def done(self) -> bool:
        """Ended: ready, failed or cancelled."""
        return self.state in ("ready", "failed", "cancelled")

    def end(self, state: ReloadState) -> None:
        """Record how the job ended."""
        self.state, self.finished = state, time.time()

    def stop(self) -> None:
        """Cancel the job unless it has ended (its result, if any, will be dropped)."""
        if not self.done:
            self.cancel.set()
            self.end("cancelled")

    def report(self) -> ReloadStatus:
        """``status()["reload"]`` (``error`` whole; the status cuts it short)."""
        return {
            "state": self.state,
            "source": self.sources[0].redacted,
            "bytes_done": self.progress.bytes_done,
            "bytes_total": self.progress.bytes_total,
            "timings": self.progress.timings.copy(),
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
        }

    def start(
        self,
        run: LoadRun,
        lock: AbstractContextManager[Any],
        swap: Callable[[ReloadJob, Loaded], bool],
        scrub: Callable[[str], str],
    ) -> None:
        """Run ``run`` in the job's daemon thread; ``lock`` guards the job's fields."""
        self.thread = threading.Thread(
            target=self._work,
            args=(run, lock, swap, scrub),
            name=f"modelcache-reload-{self.name}",
            daemon=True,
        )
        self.thread.start()

    def _work(
        self,
        run: LoadRun,
        lock: AbstractContextManager[Any],
        swap: Callable[[ReloadJob, Loaded], bool],
        scrub: Callable[[str], str],
    ) -> None:
        served = False
        try:
            fetched = run.fetch()
            with lock:
                if self.cancel.is_set():
                    return
                self.state = "loading"
                self.progress.fetched(fetched.size, fetched.cache_hit, run.timings)
            loaded = run.load(fetched)
            served = swap(self, loaded)
        except ModelCacheError as error:
            with lock:
                self.progress.timings.update(run.timings)
                if self.cancel.is_set():
                    return
                self.error = scrub(str(error))
                self.end("failed")
            log.warning(
                "model %s: reload failed, still serving the current version: %s",
                self.name,
                shorten(self.error),
            )
        finally:
            if not served:
                run.let_go()  # failed or cancelled: the fetched entry is nobody's
