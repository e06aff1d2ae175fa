"""ModelHandle: one model's weights, fetched and loaded once, eagerly, lazily or in the background.

Each handle is a small thread-safe state machine::

    NOT_LOADED -> FETCHING -> LOADING -> READY
                        \\          \\-> FAILED   (the next get() tries again)
    READY -> UNLOADED (unload(), idle_unload)      UNLOADED -> FETCHING ... on the next get()

The strategies differ only in when the work starts: ``eager`` in :meth:`ModelHandle.start`
(blocking, raising), ``lazy`` on the first :meth:`ModelHandle.get`, ``background`` in a daemon
thread started by :meth:`ModelHandle.start`. The work itself always runs in one worker thread
per attempt, so any number of threads and coroutines asking at once cause one fetch and one load.

:meth:`ModelHandle.reload` runs a second, independent job beside the serving model and swaps
the result in under the lock, so ``get()`` never waits for it and never sees half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import gc
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config
from ._hashing import normalize_sha256
from .cache import Cache, Fetched
from .errors import LoadError, ModelCacheError, NotReadyError
from .sources import Source, SourceLike, parse_sources

__all__ = ["ModelHandle", "State", "Strategy"]

log = logging.getLogger("modelcache")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class State(enum.Enum):
    """Where a handle is in its life."""

    NOT_LOADED = "not_loaded"
    FETCHING = "fetching"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


class Strategy(str, enum.Enum):
    """When a handle starts its work: in ``start()`` (eager, background) or on first ``get()``."""

    EAGER = "eager"
    LAZY = "lazy"
    BACKGROUND = "background"

    @classmethod
    def parse(cls, value: str | Strategy) -> Strategy:
        """A :class:`Strategy` from its name (case-insensitive); ``ValueError`` otherwise."""
        if isinstance(value, Strategy):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown strategy {value!r}; expected one of {names}") from None


_QUANTIZE_METHODS = ("int8",)


class _Holds:
    """How many handles of this process serve each cached file.

    The cache's lease on an entry is per process: the last handle to let go of a file gives the
    lease back, so unloading one of two handles on the same entry never lets prune evict it.
    """

    def __init__(self) -> None:
        self._counts: dict[Path, int] = {}
        self._lock = threading.Lock()

    def hold(self, path: Path) -> None:
        with self._lock:
            self._counts[path] = self._counts.get(path, 0) + 1

    def drop(self, path: Path) -> bool:
        """Let go of ``path``; True when no handle of this process serves it any more."""
        with self._lock:
            left = self._counts.get(path, 0) - 1
            if left > 0:
                self._counts[path] = left
                return False
            self._counts.pop(path, None)
            return True


_HOLDS = _Holds()


def _serving(sources: Sequence[Source], fetched: Fetched) -> Source:
    """The source (of a list of mirrors) that ``fetched`` came from."""
    return next((s for s in sources if s.redacted == fetched.source), sources[0])


def _parse_quantize(value: str | None, origin: str) -> str | None:
    if value is None or str(value).strip().lower() == "none":
        return None
    method = str(value).strip().lower()
    if method not in _QUANTIZE_METHODS:
        raise ValueError(f"{origin}: unknown quantize {value!r}; expected None or 'int8'")
    return method


def _empty_timings() -> dict[str, float | None]:
    return {"fetch_s": None, "load_s": None, "quantize_s": None, "warmup_s": None}


@dataclass
class _Attempt:
    """One fetch-and-load run of the state machine; waiters are told when it ends."""

    generation: int
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    done: bool = False


@dataclass
class _Reload:
    """One reload job: loads beside the serving model, reported under ``status()["reload"]``."""

    sources: list[Source]
    sha256: str | None
    refresh: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    state: str = "fetching"
    error: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    timings: dict[str, float | None] = field(default_factory=_empty_timings)
    started: float = field(default_factory=time.time)
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.state in ("ready", "failed", "cancelled")

    def stop(self) -> None:
        """Cancel the job unless it has ended (its result, if any, will be dropped)."""
        if not self.done:
            self.cancel.set()
            self.state, self.finished = "cancelled", time.time()

    def report(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "source": self.sources[0].redacted,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "timings": dict(self.timings),
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
        }


class ModelHandle:
    """One model: where its weights come from, how to load them, and when.

    See the API reference for every argument. Constructing a handle does no I/O and imports
    nothing heavy.
    """

    retry_interval: float = 1.0
    """Seconds after a failure during which ``get()`` raises the same error instead of retrying
    (so a broken origin is not hammered by every request). Set it per handle or on the class."""

    close_timeout: float = 30.0
    """Seconds :meth:`close` waits for a worker thread (a loader cannot be interrupted)."""

    def __init__(
        self,
        name: str,
        *,
        source: SourceLike | Sequence[SourceLike],
        sha256: str | None = None,
        loader: Callable[[Path], Any] | None = None,
        strategy: str | Strategy = "lazy",
        quantize: str | None = None,
        cache: Cache | SourceLike | None = None,
        storage_options: dict[str, Any] | None = None,
        required: bool = True,
        warmup: Callable[[Any], None] | None = None,
        idle_unload: float | None = None,
        device: str = "cpu",
    ) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"model name must be 1-64 characters of [A-Za-z0-9._-], got {name!r}")
        if idle_unload is not None and not idle_unload > 0:
            raise ValueError(f"{name}: idle_unload must be a positive number of seconds")
        if loader is not None and not callable(loader):
            raise TypeError(f"{name}: loader must be callable, got {type(loader).__name__}")
        if warmup is not None and not callable(warmup):
            raise TypeError(f"{name}: warmup must be callable, got {type(warmup).__name__}")

        self.name = name
        self._sources = parse_sources(source, storage_options)
        self._sha256 = normalize_sha256(sha256)
        self._storage_options = storage_options
        self.loader = loader
        self._strategy = Strategy.parse(strategy)
        self._quantize = _parse_quantize(quantize, name)
        self._cache_arg = cache
        self.required = required
        self.warmup = warmup
        self.idle_unload = idle_unload
        self.device = device

        self._cond = threading.Condition(threading.RLock())
        self._state = State.NOT_LOADED
        self._model: Any = None
        self._error: BaseException | None = None
        self._failed_at = 0.0
        self._generation = 0
        self._attempt: _Attempt | None = None
        self._async_waiters: list[Callable[[], None]] = []
        self._closed = threading.Event()
        self._bytes_done = 0
        self._bytes_total: int | None = None
        self._cache_hit: bool | None = None
        self._path: Path | None = None
        self._loaded_sha256: str | None = None
        self._served_from: str | None = None  # the mirror the loaded version came from
        self._timings = _empty_timings()
        self._extra: dict[str, Any] = {}
        self._last_used = time.monotonic()
        self._idle_thread: threading.Thread | None = None
        self._idle_unloaded = False
        self._reload: _Reload | None = None
        self._bytes_freed: int | None = None

    def __repr__(self) -> str:
        return f"<ModelHandle {self.name!r} {self.state.value} source={self.source!r}>"

    # -- configuration in force ---------------------------------------------------------------

    @property
    def strategy(self) -> Strategy:
        """The strategy in force (``$MODELCACHE_STRATEGY`` overrides the argument)."""
        override = config.strategy_override()
        return Strategy.parse(override) if override else self._strategy

    @property
    def quantize(self) -> str | None:
        """The quantization in force (``$MODELCACHE_QUANTIZE`` overrides the argument)."""
        override = config.quantize_override()
        if override is not None:
            return _parse_quantize(override, "MODELCACHE_QUANTIZE")
        return self._quantize

    @property
    def cache(self) -> Cache:
        """The cache this handle fetches into (the default one is resolved when used)."""
        if isinstance(self._cache_arg, Cache):
            return self._cache_arg
        if self._cache_arg is None:
            return Cache()
        return Cache(self._cache_arg)

    @property
    def sources(self) -> list[Source]:
        """The sources (mirrors in order)."""
        return list(self._sources)

    @property
    def source(self) -> str:
        """The first source, redacted (safe to show)."""
        return self._sources[0].redacted

    @property
    def sha256(self) -> str | None:
        """The expected sha256, if given."""
        return self._sha256

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._state

    @property
    def ready(self) -> bool:
        """``state is State.READY``."""
        return self._state is State.READY

    @property
    def available(self) -> bool:
        """READY, or unloaded by ``idle_unload`` (the next ``get()`` loads it again).

        This is what :attr:`Registry.ready` counts, so an idle-unloaded model does not take
        the service out of its load balancer, which would keep the request that reloads it away.
        """
        state = self._state
        if state is State.READY:
            return True
        return self._idle_unloaded and state in (State.UNLOADED, State.FETCHING, State.LOADING)

    # -- starting and getting -----------------------------------------------------------------

    def start(self) -> None:
        """Start as the strategy says: eager loads now (blocking, raising), background starts a
        daemon thread and returns at once, lazy does nothing (the first ``get()`` loads)."""
        strategy = self.strategy
        if strategy is Strategy.LAZY:
            return
        if strategy is Strategy.BACKGROUND:
            self.begin_loading()
            return
        self.get()

    def begin_loading(self) -> None:
        """Start fetching and loading in the background unless done or under way; returns at once.

        Unlike ``get()``, this retries at once after a failure (it is an explicit request).
        """
        with self._cond:
            if self._state is not State.READY:
                self._begin(retry_now=True)

    def get(self, timeout: float | None = None) -> Any:
        """The loaded model; the first call (or the first after a failure) starts the work.

        Raises the fetch's own error, :class:`LoadError`, or :class:`NotReadyError` on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._state is State.READY:
                    self._last_used = time.monotonic()
                    return self._model
                attempt = self._begin(retry_now=False)
                if attempt is None:
                    raise self._raisable()
                while not attempt.done:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._not_ready(timeout)
                    self._cond.wait(remaining)
                if self._state is State.FAILED and self._attempt is attempt:
                    raise self._raisable()

    async def aget(self, timeout: float | None = None) -> Any:
        """:meth:`get` for coroutines: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            future: asyncio.Future[None] = loop.create_future()

            def wake(future: asyncio.Future[None] = future) -> None:
                loop.call_soon_threadsafe(_resolve, future)

            with self._cond:
                if self._state is State.READY:
                    self._last_used = time.monotonic()
                    return self._model
                attempt = self._begin(retry_now=False)
                if attempt is None:
                    raise self._raisable()
                if attempt.done:
                    future.set_result(None)
                else:
                    self._async_waiters.append(wake)
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(future, remaining)
            except asyncio.TimeoutError:
                raise self._not_ready(timeout) from None
            finally:
                with self._cond:
                    if wake in self._async_waiters:
                        self._async_waiters.remove(wake)
            with self._cond:
                if self._state is State.FAILED and self._attempt is attempt:
                    raise self._raisable()

    def fetch(self) -> Path:
        """Make sure the file(s) are in the cache and return the local ``Path``; loads nothing."""
        with self._cond:
            sources, sha256 = self._sources, self._sha256
        return self._fetch(sources, sha256).path

    def _not_ready(self, timeout: float | None) -> NotReadyError:
        with self._cond:
            state, done, total = self._state, self._bytes_done, self._bytes_total
        progress = f", {_human(done)} of {_human(total)}" if state is State.FETCHING else ""
        return NotReadyError(
            f"not ready after {timeout}s (state: {state.value}{progress})",
            model=self.name,
            source=self.source,
        )

    def _raisable(self) -> BaseException:
        """A copy of the last error to raise in the caller (the original keeps its traceback).

        Raising one exception object from many threads would grow its traceback each time.
        """
        error = self._error
        assert error is not None
        try:
            clone = copy.copy(error)
        except Exception:
            return error
        clone.__cause__, clone.__context__ = error.__cause__, error.__context__
        clone.__suppress_context__ = error.__suppress_context__
        return clone.with_traceback(error.__traceback__)

    def _begin(self, *, retry_now: bool) -> _Attempt | None:
        """The attempt to wait for, starting one if none runs; ``None``: raise the last error.

        Called with the lock held.
        """
        attempt = self._attempt
        if attempt is not None and not attempt.done:
            return attempt
        if (
            self._state is State.FAILED
            and not retry_now
            and time.monotonic() - self._failed_at < self.retry_interval
        ):
            return None
        self._closed.clear()
        self._generation += 1
        attempt = _Attempt(self._generation)
        self._attempt = attempt
        self._state = State.FETCHING
        self._error = None
        self._bytes_done, self._bytes_total, self._cache_hit = 0, None, None
        self._timings = _empty_timings()
        thread = threading.Thread(
            target=self._run, args=(attempt,), name=f"modelcache-load-{self.name}", daemon=True
        )
        attempt.thread = thread
        thread.start()
        return attempt

    # -- the work -----------------------------------------------------------------------------

    def _fetch(
        self,
        sources: Sequence[Source],
        sha256: str | None,
        *,
        refresh: bool = False,
        progress: Callable[[int, int | None], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Fetched:
        try:
            return self.cache.fetch_details(
                [s.url for s in sources],
                sha256,
                self._storage_options,
                progress=progress,
                model=self.name,
                cancel=cancel,
                refresh=refresh,
            )
        except ModelCacheError as error:
            raise error.with_model(self.name) from None

    def _run(self, attempt: _Attempt) -> None:
        """One attempt, in its own thread: fetch, load, quantize, warm up; then READY or FAILED."""
        model: Any = None
        fetched: Fetched | None = None
        error: BaseException | None = None
        timings: dict[str, float | None] = {}
        with self._cond:
            sources, sha256 = self._sources, self._sha256

        def progress(done: int, total: int | None) -> None:
            if self._attempt is attempt:
                self._bytes_done, self._bytes_total = done, total

        try:
            started = time.monotonic()
            fetched = self._fetch(sources, sha256, progress=progress, cancel=attempt.cancel)
            timings["fetch_s"] = round(time.monotonic() - started, 4)
            with self._cond:
                if self._attempt is not attempt:
                    return  # unloaded or closed while fetching: do not load
                self._state = State.LOADING
                self._cache_hit = fetched.cache_hit
                self._bytes_total = fetched.size
                self._bytes_done = fetched.size or 0
                self._timings.update(timings)
            model = self._load(fetched, timings, _serving(sources, fetched))
        except Exception as failure:
            error = self._as_error(failure, sources[0])
        except BaseException as failure:  # SystemExit or the like in this thread: still end
            error = LoadError(
                f"interrupted: {type(failure).__name__}",
                model=self.name,
                source=sources[0].redacted,
            )
            raise
        finally:
            self._finish(attempt, model, fetched, timings, error)

    def _finish(
        self,
        attempt: _Attempt,
        model: Any,
        fetched: Fetched | None,
        timings: dict[str, float | None],
        error: BaseException | None,
    ) -> None:
        with self._cond:
            attempt.done = True
            if self._attempt is not attempt:
                return  # unloaded or closed while working: drop the result
            self._timings.update(timings)
            if error is None and fetched is not None:
                self._model = model
                self._path = fetched.path
                _HOLDS.hold(fetched.path)
                self._loaded_sha256 = fetched.sha256
                self._served_from = fetched.source
                self._state = State.READY
                self._last_used = time.monotonic()
                log.info("model %s ready (%s)", self.name, _describe(self._timings))
            else:
                self._state = State.FAILED
                self._error = error or LoadError(
                    "the attempt ended without a result", model=self.name, source=self.source
                )
                self._failed_at = time.monotonic()
                if attempt.cancel.is_set():
                    log.info("model %s: stopped (%s)", self.name, self._scrub(str(self._error)))
                else:
                    log.warning("model %s failed: %s", self.name, self._scrub(str(self._error)))
            self._notify()
        if error is None and self.idle_unload:
            self._start_idle_watch()

    def _as_error(self, failure: Exception, source: Source) -> ModelCacheError:
        if isinstance(failure, ModelCacheError):
            return failure.with_model(self.name)
        error = LoadError(
            f"{type(failure).__name__}: {source.scrub(str(failure))}",
            model=self.name,
            source=source.redacted,
        )
        error.__cause__ = failure
        return error

    def _load(self, fetched: Fetched, timings: dict[str, float | None], source: Source) -> Any:
        """Load, quantize and warm up the model at ``fetched.path``; fills ``timings``."""
        started = time.monotonic()
        model = self._call_loader(fetched.path, source)
        timings["load_s"] = round(time.monotonic() - started, 4)
        method = self.quantize
        if method is not None:
            started = time.monotonic()
            model = self._apply_quantization(model, method, fetched, source)
            timings["quantize_s"] = round(time.monotonic() - started, 4)
        if self.warmup is not None:
            started = time.monotonic()
            try:
                self.warmup(model)
            except Exception as error:
                raise LoadError(
                    f"warmup failed: {type(error).__name__}: {source.scrub(str(error))}",
                    model=self.name,
                    source=source.redacted,
                ) from error
            timings["warmup_s"] = round(time.monotonic() - started, 4)
        return model

    def _call_loader(self, path: Path, source: Source) -> Any:
        from .loaders import default_loader

        try:
            if self.loader is not None:
                return self.loader(path)
            return default_loader(path, self.device)
        except Exception as error:
            if isinstance(error, ModelCacheError) and error.model and error.source:
                raise
            reason = error.reason if isinstance(error, ModelCacheError) else str(error)
            raise LoadError(
                f"loading {path.name} failed: {type(error).__name__}: {source.scrub(reason)}",
                model=self.name,
                source=source.redacted,
            ) from error

    def _apply_quantization(self, model: Any, method: str, fetched: Fetched, source: Source) -> Any:
        try:
            from .quantize import quantize_model

            quantized, info = quantize_model(
                model,
                method,
                name=self.name,
                source=source.redacted,
                cache=self.cache,
                source_sha256=fetched.sha256,
                path=fetched.path,
            )
        except ModelCacheError:
            raise
        except Exception as error:
            raise LoadError(
                f"{method} quantization failed: {type(error).__name__}: {error}",
                model=self.name,
                source=source.redacted,
            ) from error
        with self._cond:
            self._extra["quantization"] = info
        return quantized

    def _notify(self) -> None:
        """Wake every waiter (threads and coroutines). Called with the lock held."""
        self._cond.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        for wake in waiters:
            with contextlib.suppress(RuntimeError):  # the waiter's event loop is closed
                wake()

    # -- unloading and idle -------------------------------------------------------------------

    def unload(self) -> None:
        """Drop the loaded object; a later ``get()`` loads again.

        Memory is freed once callers drop their references too: the handle collects garbage
        and hands freed heap back to the OS (``malloc_trim``), and reports the resident bytes
        released as ``status()["bytes_freed"]``. A fetch or load under way is abandoned.
        """
        self._unload(idle_for=None)

    def _unload(self, idle_for: float | None) -> bool:
        with self._cond:
            if idle_for is not None and (
                self._state is not State.READY or time.monotonic() - self._last_used < idle_for
            ):
                return False
            model, self._model = self._model, None
            attempt = self._attempt
            if attempt is not None and not attempt.done:
                attempt.cancel.set()
                attempt.done = True  # its result will be dropped; waiters start again
                self._attempt = None
                self._notify()
            if self._state is not State.NOT_LOADED or model is not None:
                self._state = State.UNLOADED
            self._idle_unloaded = idle_for is not None
            self._error = None
            path, self._path = self._path, None
            before = _rss() if model is not None else None
        if model is not None:
            del model
            freed = _free_memory(before)
            with self._cond:
                self._bytes_freed = freed
            log.info("model %s unloaded (%s freed)", self.name, _human(freed))
        if path is not None:
            self._release(path)
        return True

    def _release(self, path: Path) -> None:
        """Let the cache evict the entry at ``path`` again, unless another handle serves it."""
        cache = self.cache
        if _HOLDS.drop(path) and path.parent.parent == cache.path / "refs":
            cache.release(path.parent.name)

    def _start_idle_watch(self) -> None:
        with self._cond:
            if self._idle_thread is not None and self._idle_thread.is_alive():
                return
            self._idle_thread = threading.Thread(
                target=self._idle_watch, name=f"modelcache-idle-{self.name}", daemon=True
            )
            self._idle_thread.start()

    def _idle_watch(self) -> None:
        """Unload once no ``get()`` came for ``idle_unload`` seconds; ends when not READY."""
        idle_unload = self.idle_unload
        assert idle_unload is not None
        interval = min(1.0, idle_unload / 4)
        while not self._closed.wait(interval):
            with self._cond:
                if self._state is not State.READY:
                    return
            if self._unload(idle_for=idle_unload):
                log.info("model %s was idle for %.1fs: unloaded", self.name, idle_unload)
                return

    # -- reload -------------------------------------------------------------------------------

    def reload(
        self,
        source: SourceLike | Sequence[SourceLike] | None = None,
        sha256: str | None = None,
    ) -> None:
        """Load a new version beside the current one and swap atomically once it is READY.

        ``get()`` keeps returning the current object meanwhile and never waits. If the new
        version fails, the current one keeps serving and the error shows in ``status()``.
        Without arguments the same source is fetched again (a file given without ``sha256``
        is downloaded anew, for a URL whose content changed). A newer ``reload()`` supersedes
        one still under way. When nothing is loaded yet, this starts an ordinary load.
        Returns at once.
        """
        sources = parse_sources(source, self._storage_options) if source is not None else None
        digest = normalize_sha256(sha256)
        with self._cond:
            if self._state is not State.READY:
                self._reconfigure(sources, digest)
                self._begin(retry_now=True)
                return
            if self._reload is not None:
                self._reload.stop()
            job = _Reload(
                sources=sources or list(self._sources),
                sha256=digest if (sources is not None or digest is not None) else self._sha256,
                refresh=sources is None and digest is None,
            )
            job.thread = threading.Thread(
                target=self._run_reload,
                args=(job,),
                name=f"modelcache-reload-{self.name}",
                daemon=True,
            )
            self._reload = job
            job.thread.start()

    def _reconfigure(self, sources: list[Source] | None, digest: str | None) -> None:
        """Use new sources/sha256 for the next attempt, abandoning one that runs with the old."""
        if sources is None and digest is None:
            return
        self._sources = sources or self._sources
        self._sha256 = digest
        attempt = self._attempt
        if attempt is not None and not attempt.done:
            attempt.cancel.set()
            attempt.done = True
            self._attempt = None
            self._notify()

    def _run_reload(self, job: _Reload) -> None:
        def progress(done: int, total: int | None) -> None:
            job.bytes_done, job.bytes_total = done, total

        timings: dict[str, float | None] = {}
        try:
            started = time.monotonic()
            fetched = self._fetch(
                job.sources, job.sha256, refresh=job.refresh, progress=progress, cancel=job.cancel
            )
            timings["fetch_s"] = round(time.monotonic() - started, 4)
            with self._cond:
                if job.cancel.is_set():
                    return
                job.state = "loading"
                job.bytes_total = fetched.size
                job.bytes_done = fetched.size or 0
                job.timings.update(timings)
            model = self._load(fetched, timings, _serving(job.sources, fetched))
        except Exception as failure:
            error = self._as_error(failure, job.sources[0])
            with self._cond:
                job.timings.update(timings)
                if job.cancel.is_set():
                    return
                job.state, job.finished = "failed", time.time()
                job.error = self._scrub(str(error), job.sources)
            log.warning(
                "model %s: reload failed, still serving the current version: %s",
                self.name,
                job.error,
            )
            return
        with self._cond:
            job.timings.update(timings)
            if job.cancel.is_set() or self._state is not State.READY or self._reload is not job:
                job.state, job.finished = "cancelled", time.time()
                return  # superseded, unloaded or closed meanwhile: drop the new model
            old, self._model = self._model, model
            old_path, self._path = self._path, fetched.path
            if old_path != fetched.path:
                _HOLDS.hold(fetched.path)
            self._sources, self._sha256 = job.sources, job.sha256
            self._loaded_sha256 = fetched.sha256
            self._served_from = fetched.source
            self._cache_hit = fetched.cache_hit
            self._bytes_total = fetched.size
            self._bytes_done = fetched.size or 0
            self._timings = {**_empty_timings(), **timings}
            job.state, job.finished = "ready", time.time()
            before = _rss()
        del model
        del old
        freed = _free_memory(before, collect=False)  # a full gc would pause the serving threads
        with self._cond:
            self._bytes_freed = freed
        if old_path is not None and old_path != fetched.path:
            self._release(old_path)
        log.info("model %s reloaded (%s freed)", self.name, _human(freed))

    # -- closing ------------------------------------------------------------------------------

    def _stop(self) -> None:
        """Ask background work to stop (downloads are cancelled); does not wait."""
        self._closed.set()
        with self._cond:
            if self._attempt is not None and not self._attempt.done:
                self._attempt.cancel.set()
            if self._reload is not None:
                self._reload.stop()

    def _threads(self) -> list[threading.Thread]:
        with self._cond:
            threads = [
                self._attempt.thread if self._attempt else None,
                self._reload.thread if self._reload else None,
                self._idle_thread,
            ]
        return [t for t in threads if t is not None and t is not threading.current_thread()]

    def close(self, timeout: float | None = None) -> None:
        """Stop background work, wait for its threads, and unload.

        A download under way is cancelled (its part file stays in the cache's ``.tmp`` to be
        resumed; nothing half-written is published). A loader cannot be interrupted: ``close``
        waits up to ``timeout`` seconds (default :attr:`close_timeout`) for it. A later
        ``get()`` starts again.
        """
        self._stop()
        limit = self.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "model %s: thread %s still running after close()", self.name, thread.name
                )
        self.unload()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: state, progress, timings, error (all redacted)."""
        with self._cond:
            error = self._error
            reload = self._reload.report() if self._reload else None
            status: dict[str, Any] = {
                "name": self.name,
                "state": self._state.value,
                "strategy": _safe(lambda: self.strategy.value),
                "source": self.source,
                "served_from": self._served_from if self._state is State.READY else None,
                "bytes_total": self._bytes_total,
                "bytes_done": self._bytes_done,
                "cache_hit": self._cache_hit,
                "quantize": _safe(lambda: self.quantize),
                "timings": dict(self._timings),
                "error": None,
                "required": self.required,
                "device": self.device,
                "sha256": self._loaded_sha256 or self._sha256,
                "path": str(self._path) if self._path else None,
                "idle_unload": self.idle_unload,
                "idle_unloaded": self._idle_unloaded and self._state is not State.READY,
                "idle_s": round(time.monotonic() - self._last_used, 3)
                if self._state is State.READY
                else None,
                "bytes_freed": self._bytes_freed,
                "reload": reload,
            }
            status.update(self._extra)
        if error is not None:
            status["error"] = self._scrub(f"{type(error).__name__}: {error}")
        elif reload is not None and reload["state"] == "failed":
            status["error"] = f"reload failed: {reload['error']}"
        return status

    def _scrub(self, text: str, sources: Sequence[Source] | None = None) -> str:
        for source in [*self._sources, *(sources or ())]:
            text = source.scrub(text)
        return text


def _safe(read: Callable[[], str | None]) -> str | None:
    """A configuration value for ``status()``; a bad environment value shows as an error text."""
    try:
        return read()
    except ValueError as error:
        return f"invalid: {error}"


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(timings: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in timings.items() if v is not None)


def _rss() -> int | None:
    """This process's resident set size in bytes (Linux), or ``None``."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _free_memory(before: int | None, *, collect: bool = True) -> int | None:
    """Collect garbage and give freed heap back to the OS; the resident bytes released since
    ``before`` (measured while the model was still referenced)."""
    if collect:
        gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    after = _rss()
    if before is None or after is None:
        return None
    return max(0, before - after)


def _human(size: int | None) -> str:
    if size is None:
        return "unknown"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
