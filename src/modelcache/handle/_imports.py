"""Import what the loader needs while a long download runs, so the two overlap.

A service that leaves ``import torch`` to its loader pays 1-2 s for it after a cold download.
Imported on a thread of its own while the bytes arrive, it costs nothing more, provided the
download outlasts it: the import holds the GIL for most of that time, so the download's threads
slow down while it runs. Alongside a download about as short as the import itself, both slow
each other and the sum is no better than one after the other (bench_cold_start, 1 GiB at
8 Gbit/s on 2 cores: 2.55-2.88 s against 2.44 s); alongside a long one the import is hidden
(at 2 Gbit/s: 4.8-5.0 s against 5.7 s). So the imports start only once the download's own
rate says that it has :data:`AHEAD_OF` seconds or more to go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["AHEAD_OF", "ImportAhead"]

log = logging.getLogger("modelcache")

#: seconds a download must still have to go for the imports to start beside it
AHEAD_OF = 3.0
#: seconds of a download its rate is measured over before projecting what is left
MEASURED_OVER = 0.25


class ImportAhead:
    """Runs ``prepare`` (the loader's imports) on its own thread during a long download.

    :meth:`progress` is the download's progress callback; :meth:`wait` joins the thread, if it
    started, before the loader runs (one thread imports a module at a time).
    """

    def __init__(
        self,
        prepare: Callable[[], object],
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._prepare = prepare
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._first: tuple[float, int] | None = None
        self._thread: threading.Thread | None = None

    def progress(self, done: int, total: int | None) -> None:
        """Start the imports once the download has :data:`AHEAD_OF` seconds or more to go."""
        now = self._clock()
        with self._lock:
            if self._thread is not None:
                return
            if self._first is None:
                self._first = (now, done)
                return
            began, done_then = self._first
            elapsed = now - began
            if elapsed < MEASURED_OVER:
                return
            if total is None:
                left = AHEAD_OF if elapsed >= AHEAD_OF else 0.0  # no size: by how long it lasts
            else:
                rate = (done - done_then) / elapsed
                left = (total - done) / rate if rate > 0 else AHEAD_OF
            if left < AHEAD_OF:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"modelcache-imports-{self._name}", daemon=True
            )
            self._thread.start()

    def wait(self) -> None:
        """Return once the imports started during the download are done."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            self._prepare()
        except Exception as error:  # the loader imports again, and reports it in context
            log.debug("importing ahead of the load of %s failed: %s", self._name, error)
