"""The state machine under a :class:`~modelcache.ModelHandle`::

    NOT_LOADED -> FETCHING -> LOADING -> READY
                        \\          \\-> FAILED   (the next get() tries again)
    READY -> UNLOADED (unload(), idle_unload)      UNLOADED -> FETCHING ... on the next get()

It decides who runs what and when, and what callers see: one :class:`~._attempt.Attempt` at a
time runs the load pipeline (:class:`~._pipeline.LoadRun`) in a worker thread while any number
of callers wait for it; a reload runs the same pipeline beside the serving version
(:class:`~._reload.ReloadJob`) and :meth:`StateMachine._swap` installs its result.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from modelcache._sources import Source
from modelcache.cache import Cache
from modelcache.errors import LoadError, ModelCacheError, NotReadyError, shorten

from . import _holds
from ._attempt import Attempt
from ._idle import IdleWatch
from ._memory import free_memory, human, rss
from ._pipeline import Loaded, LoadRun, Options
from ._reload import ReloadJob
from ._state import State
from ._status import Progress, Timings

__all__ = ["Host", "StateMachine"]

log = logging.getLogger("modelcache")


class Host(Options, Protocol):
    """What the state machine reads of its handle, each time it needs it."""

    retry_interval: float
    idle_unload: float | None


class StateMachine:
    """The states of one handle, its attempts, and the version it serves.

    Fields are read and written under :attr:`lock`. ``sources`` and ``sha256`` say what the
    next attempt loads (a reload replaces them when its version is installed).
    """

    def __init__(
        self,
        host: Host,
        sources: list[Source],
        sha256: str | None,
        storage_options: Mapping[str, Any] | None,
    ) -> None:
        self._host_ref = weakref.ref(host)  # the handle owns this machine: no cycle
        self._name = host.name
        self._storage_options = storage_options
        self.lock = threading.RLock()
        self.sources, self.sha256 = sources, sha256
        self.state = State.NOT_LOADED
        self.error: ModelCacheError | None = None
        self.failed_at = 0.0
        self.progress = Progress()
        self.model: Any = None
        # the cache, cached file and entry key of the version served
        self._held: tuple[Cache, Path, str | None] | None = None
        self.loaded_sha256: str | None = None
        self.served_from: str | None = None  # the mirror the version served came from
        self.quantization: dict[str, Any] | None = None
        self.last_used = time.monotonic()
        self.idle_unloaded = False
        self.bytes_freed: int | None = None
        self.reload_job: ReloadJob | None = None
        self.closed = threading.Event()
        self._attempt: Attempt | None = None
        self._idle = IdleWatch(host.name, self.closed)

    @property
    def path(self) -> Path | None:
        """The cached file (or directory) of the version served."""
        return self._held[1] if self._held else None

    @property
    def _host(self) -> Host:
        """The handle. Every caller holds it: a method of it called, or a thread of this
        machine, which gets the handle as an argument and keeps it while it runs."""
        host = self._host_ref()
        assert host is not None
        return host

    def scrub(self, text: str, sources: Sequence[Source] = ()) -> str:
        """``text`` with every source's credentials masked."""
        for source in [*self.sources, *sources]:
            text = source.scrub(text)
        return text

    # -- waiting ------------------------------------------------------------------------------

    def get(self, timeout: float | None) -> Any:
        """The model, once READY; starts an attempt if none runs (see ``ModelHandle.get``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            model, attempt = self._poll()
            if attempt is None:
                return model
            if not attempt.wait(None if deadline is None else deadline - time.monotonic()):
                raise self._not_ready(timeout)
            self._raise_if_failed(attempt)

    async def aget(self, timeout: float | None) -> Any:
        """:meth:`get` for coroutines."""
        import asyncio  # imported by the caller's event loop already; 15 ms for everyone else

        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            model, attempt = self._poll()
            if attempt is None:
                return model
            if not await attempt.wait_async(None if deadline is None else deadline - loop.time()):
                raise self._not_ready(timeout)
            self._raise_if_failed(attempt)

    def _poll(self) -> tuple[Any, Attempt | None]:
        """The model when READY, else the attempt to wait for (started if none runs). Within
        ``retry_interval`` of a failure, raises that failure again instead."""
        with self.lock:
            if self.state is State.READY:
                self.last_used = time.monotonic()
                return self.model, None
            attempt = self.begin(retry_now=False)
            if attempt is None:
                raise _fresh(self.error)
            return None, attempt

    def _raise_if_failed(self, attempt: Attempt) -> None:
        with self.lock:
            if self.state is State.FAILED and self._attempt is attempt:
                raise _fresh(self.error)

    def _not_ready(self, timeout: float | None) -> NotReadyError:
        with self.lock:
            state, done, total = self.state, self.progress.bytes_done, self.progress.bytes_total
        shown = f", {human(done)} of {human(total)}" if state is State.FETCHING else ""
        return NotReadyError(
            f"not ready after {timeout}s (state: {state.value}{shown})",
            model=self._name,
            source=self.sources[0].redacted,
        )

    # -- attempts -----------------------------------------------------------------------------

    def begin(self, *, retry_now: bool) -> Attempt | None:
        """The attempt under way, or a new one; ``None`` within ``retry_interval`` of a failure
        (unless ``retry_now``)."""
        with self.lock:
            attempt = self._attempt
            if attempt is not None and not attempt.done:
                return attempt
            if (
                self.state is State.FAILED
                and not retry_now
                and time.monotonic() - self.failed_at < self._host.retry_interval
            ):
                return None
            self.closed.clear()
            attempt = self._attempt = Attempt()
            self.state, self.error, self.progress = State.FETCHING, None, Progress()
            attempt.thread = threading.Thread(
                target=self._work,
                args=(attempt, self._host),
                name=f"modelcache-load-{self._name}",
                daemon=True,
            )
            attempt.thread.start()
            return attempt

    def _abandon(self) -> None:
        """Drop the attempt under way: its result is ignored and its waiters start again."""
        attempt, self._attempt = self._attempt, None
        if attempt is not None and not attempt.done:
            attempt.cancel.set()
            attempt.end()

    def new_run(self, sources: Sequence[Source], sha256: str | None, **options: Any) -> LoadRun:
        """A run of the load pipeline for this handle (``options``: see :class:`LoadRun`)."""
        return LoadRun(self._host, sources, sha256, self._storage_options, **options)

    def _work(self, attempt: Attempt, host: Host) -> None:
        """The worker thread of one attempt: fetch, load, quantize, warm up; READY or FAILED.

        It holds the handle (``host``) while it runs, as a reload's thread does through its run.
        """
        with self.lock:
            sources, sha256 = self.sources, self.sha256

        def progress(done: int, total: int | None) -> None:
            if self._attempt is attempt:
                self.progress.update(done, total)

        run = LoadRun(
            host, sources, sha256, self._storage_options, progress=progress, cancel=attempt.cancel
        )
        loaded: Loaded | None = None
        error: ModelCacheError | None = None
        try:
            fetched = run.fetch()
            with self.lock:
                if self._attempt is not attempt:
                    return  # unloaded or closed while fetching: do not load
                self.state = State.LOADING
                self.progress.fetched(fetched.size, fetched.cache_hit, run.timings)
            loaded = run.load(fetched)
        except ModelCacheError as failure:
            error = failure
        except BaseException as failure:  # SystemExit or the like in this thread: still end
            error = LoadError(
                f"interrupted: {type(failure).__name__}",
                model=self._name,
                source=sources[0].redacted,
            )
            raise
        finally:
            self._finish(attempt, run, loaded, error, host.idle_unload)

    def _finish(
        self,
        attempt: Attempt,
        run: LoadRun,
        loaded: Loaded | None,
        error: ModelCacheError | None,
        idle_unload: float | None,
    ) -> None:
        """End the attempt: READY with ``loaded``, or FAILED. A result not served is let go of
        before anyone waiting on the attempt wakes up."""
        old_held = None
        with self.lock:
            if self._attempt is not attempt:
                run.let_go()
                attempt.end()
                return  # unloaded or closed while working: drop the result
            if loaded is not None:
                _, old_held = self._install(loaded)
                self.state, self.last_used = State.READY, time.monotonic()
                log.info("model %s ready (%s)", self._name, _describe(self.progress.timings))
            else:
                run.let_go()
                self.progress.timings.update(run.timings)
                self.state, self.failed_at = State.FAILED, time.monotonic()
                self.error = error or LoadError(
                    "the attempt ended without a result",
                    model=self._name,
                    source=self.sources[0].redacted,
                )
                shown = shorten(self.scrub(str(self.error)))
                if attempt.cancel.is_set():
                    log.info("model %s: stopped (%s)", self._name, shown)
                else:
                    log.warning("model %s failed: %s", self._name, shown)
            attempt.end()
        if old_held is not None:
            _holds.let_go(*old_held)
        if loaded is not None and idle_unload:
            with self.lock:
                self._idle.start(
                    idle_unload,
                    lambda: self.state is State.READY,
                    lambda idle_for: self.unload(idle_for=idle_for),
                )

    def _install(self, loaded: Loaded) -> tuple[Any, tuple[Cache, Path, str | None] | None]:
        """Serve ``loaded`` (lock held; its run's hold on the file passes to the handle); returns
        the model and the cached file it replaces, which the caller lets go of."""
        fetched = loaded.fetched
        old_model, self.model = self.model, loaded.model
        old_held, self._held = self._held, (loaded.cache, fetched.path, fetched.key)
        self.loaded_sha256, self.served_from = fetched.sha256, fetched.source
        self.quantization = loaded.quantization
        self.progress = Progress()
        self.progress.fetched(fetched.size, fetched.cache_hit, loaded.timings)
        return old_model, old_held

    # -- unloading ----------------------------------------------------------------------------

    def unload(self, idle_for: float | None = None) -> bool:
        """Drop the model (and any attempt under way); with ``idle_for``, only a READY model
        unused for that long. True when it unloaded."""
        with self.lock:
            if idle_for is not None and (
                self.state is not State.READY or time.monotonic() - self.last_used < idle_for
            ):
                return False
            model, self.model = self.model, None
            self._abandon()
            if self.state is not State.NOT_LOADED or model is not None:
                self.state = State.UNLOADED
            self.idle_unloaded = idle_for is not None
            self.error = None
            held, self._held = self._held, None
        if model is not None:
            before = rss()
            del model
            self._freed(free_memory(before), "unloaded")
        if held is not None:
            _holds.let_go(*held)
        return True

    def _freed(self, freed: int | None, what: str) -> None:
        with self.lock:
            self.bytes_freed = freed
        log.info("model %s %s (%s freed)", self._name, what, human(freed))

    # -- reload -------------------------------------------------------------------------------

    def reload(self, sources: list[Source] | None, sha256: str | None) -> None:
        """Load ``sources``/``sha256`` (``None``: the same again) beside the served version,
        or as an ordinary attempt when nothing is READY (see ``ModelHandle.reload``)."""
        same = sources is None and sha256 is None
        with self.lock:
            if self.state is not State.READY:
                if not same:  # the next attempt loads the new version; one under way is dropped
                    self.sources, self.sha256 = sources or self.sources, sha256
                    self._abandon()
                self.begin(retry_now=True)
                return
            if self.reload_job is not None:
                self.reload_job.stop()
            job = self.reload_job = ReloadJob(
                self._name, sources or list(self.sources), self.sha256 if same else sha256, same
            )
            run = self.new_run(
                job.sources, job.sha256, refresh=same, progress=job.progress.update,
                cancel=job.cancel,
            )  # fmt: skip
            job.start(run, self.lock, self._swap, lambda text: self.scrub(text, job.sources))

    def _swap(self, job: ReloadJob, loaded: Loaded) -> bool:
        """Serve the reloaded version, unless the job was superseded, unloaded or closed; True
        when it is served."""
        with self.lock:
            job.progress.timings.update(loaded.timings)
            if job.cancel.is_set() or self.state is not State.READY or self.reload_job is not job:
                job.end("cancelled")
                return False
            old, old_held = self._install(loaded)
            self.sources, self.sha256 = job.sources, job.sha256
            job.end("ready")
            before = rss()
        del loaded, old
        self._freed(free_memory(before, collect=False), "reloaded")  # no pause for a full gc
        if old_held is not None:
            _holds.let_go(*old_held)
        return True

    # -- stopping -----------------------------------------------------------------------------

    def stop(self) -> list[threading.Thread]:
        """Ask background work to stop (downloads are cancelled); its threads, to wait for."""
        self.closed.set()
        with self.lock:
            attempt, job = self._attempt, self.reload_job
            if attempt is not None and not attempt.done:
                attempt.cancel.set()
            if job is not None:
                job.stop()
            threads = [
                attempt.thread if attempt else None,
                job.thread if job else None,
                self._idle.thread,
            ]
        return [t for t in threads if t is not None and t is not threading.current_thread()]


def _fresh(error: BaseException | None) -> BaseException:
    """A copy of ``error`` to raise in one more caller (the original keeps its traceback).

    Raising one exception object from many threads would grow its traceback each time.
    """
    assert error is not None
    try:
        clone = copy.copy(error)
    except Exception:
        return error
    clone.__cause__, clone.__context__ = error.__cause__, error.__context__
    clone.__suppress_context__ = error.__suppress_context__
    return clone.with_traceback(error.__traceback__)


def _describe(timings: Timings) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in timings.items() if v is not None)
