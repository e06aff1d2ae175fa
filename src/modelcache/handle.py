"""ModelHandle: one model's weights, fetched and loaded once, eagerly, lazily or in the background.

Each handle is a small thread-safe state machine::

    NOT_LOADED -> FETCHING -> LOADING -> READY
                        \\          \\-> FAILED   (the next get() tries again)
    READY -> UNLOADED (unload(), idle_unload)      UNLOADED -> FETCHING ... on the next get()

The strategies differ only in when the work starts: ``eager`` in :meth:`ModelHandle.start`
(blocking, raising), ``lazy`` on the first :meth:`ModelHandle.get`, ``background`` in a daemon
thread started by :meth:`ModelHandle.start`. The work itself always runs in one worker thread
per attempt, so any number of threads and coroutines asking at once cause one fetch and one load.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config
from .cache import Cache, Fetched
from .errors import LoadError, ModelCacheError, NotReadyError
from .sources import Source, SourceLike, parse_sources

__all__ = ["ModelHandle", "State", "Strategy"]

log = logging.getLogger("modelcache")

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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


def _parse_quantize(value: str | None, origin: str) -> str | None:
    if value is None or str(value).lower() == "none":
        return None
    method = str(value).lower()
    if method not in _QUANTIZE_METHODS:
        raise ValueError(f"{origin}: unknown quantize {value!r}; expected None or 'int8'")
    return method


@dataclass
class _Attempt:
    """One fetch-and-load run; waiters are told when it ends."""

    generation: int
    thread: threading.Thread | None = None
    done: bool = False


class ModelHandle:
    """One model: where its weights come from, how to load them, and when.

    See the API reference for every argument. Constructing a handle does no I/O and imports
    nothing heavy.
    """

    retry_interval: float = 1.0
    """Seconds after a failure during which ``get()`` raises the same error instead of retrying."""

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
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"model name must be 1-64 characters of [A-Za-z0-9._-], got {name!r}"
            )
        if idle_unload is not None and idle_unload <= 0:
            raise ValueError(f"{name}: idle_unload must be a positive number of seconds")
        from .cache import normalize_sha256

        self.name = name
        self._raw_source = source
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
        self._cancel = threading.Event()
        self._bytes_done = 0
        self._bytes_total: int | None = None
        self._cache_hit: bool | None = None
        self._path: Path | None = None
        self._loaded_sha256: str | None = None
        self._timings: dict[str, float | None] = {}
        self._extra: dict[str, Any] = {}
        self._last_used = time.monotonic()
        self._idle_thread: threading.Thread | None = None
        self._reload: dict[str, Any] | None = None
        self._reload_thread: threading.Thread | None = None
        self._bytes_freed: int | None = None
        self._reset_progress()

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
        """The cache this handle fetches into."""
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

    # -- starting and getting -----------------------------------------------------------------

    def start(self) -> None:
        """eager: fetch and load now (blocking, raising); background: start a thread; lazy: nothing."""
        strategy = self.strategy
        if strategy is Strategy.LAZY:
            return
        if strategy is Strategy.BACKGROUND:
            self.begin_loading()
            return
        self.get()

    def begin_loading(self) -> None:
        """Start fetching and loading in the background unless done or under way; returns at once."""
        with self._cond:
            if self._state is State.READY:
                return
            self._begin(retry_now=True)

    def get(self, timeout: float | None = None) -> Any:
        """The loaded model; the first call (or the first after a failure) starts the work.

        Raises the fetch's own error, :class:`LoadError`, or :class:`NotReadyError` on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._state is State.READY:
                    self._touch()
                    return self._model
                attempt = self._begin(retry_now=False)
                if attempt is None:
                    assert self._error is not None
                    raise self._error
                while not attempt.done:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._not_ready(timeout)
                    self._cond.wait(remaining)
                if self._state is State.FAILED and self._attempt is attempt:
                    assert self._error is not None
                    raise self._error

    async def aget(self, timeout: float | None = None) -> Any:
        """:meth:`get` for coroutines: waits without blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cond:
                if self._state is State.READY:
                    self._touch()
                    return self._model
                attempt = self._begin(retry_now=False)
                if attempt is None:
                    assert self._error is not None
                    raise self._error
                if not attempt.done:
                    future: asyncio.Future[None] = loop.create_future()

                    def wake(future: asyncio.Future[None] = future) -> None:
                        loop.call_soon_threadsafe(_resolve, future)

                    self._async_waiters.append(wake)
                else:
                    future = loop.create_future()
                    future.set_result(None)
            remaining = None if deadline is None else deadline - loop.time()
            try:
                await asyncio.wait_for(future, remaining)
            except asyncio.TimeoutError:
                raise self._not_ready(timeout) from None
            with self._cond:
                if self._state is State.FAILED and self._attempt is attempt:
                    assert self._error is not None
                    raise self._error

    def fetch(self) -> Path:
        """Make sure the file(s) are in the cache and return the local ``Path``; loads nothing."""
        return self._fetch(self._sources, self._sha256).path

    def _not_ready(self, timeout: float | None) -> NotReadyError:
        return NotReadyError(
            f"not ready after {timeout}s (state: {self._state.value})",
            model=self.name, source=self.source,
        )

    def _touch(self) -> None:
        self._last_used = time.monotonic()

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
        if self._closed.is_set():
            self._closed.clear()
            self._cancel.clear()
        self._generation += 1
        attempt = _Attempt(self._generation)
        self._attempt = attempt
        self._state = State.FETCHING
        self._error = None
        self._reset_progress()
        thread = threading.Thread(
            target=self._run, args=(attempt,), name=f"modelcache-{self.name}", daemon=True
        )
        attempt.thread = thread
        thread.start()
        return attempt

    def _reset_progress(self) -> None:
        self._bytes_done = 0
        self._bytes_total = None
        self._cache_hit = None
        self._timings = {"fetch_s": None, "load_s": None, "quantize_s": None, "warmup_s": None}

    # -- the work -----------------------------------------------------------------------------

    def _on_progress(self, done: int, total: int | None) -> None:
        self._bytes_done = done
        self._bytes_total = total

    def _fetch(self, sources: Sequence[Source], sha256: str | None, refresh: bool = False) -> Fetched:
        try:
            return self.cache.fetch_details(
                [s.url for s in sources], sha256, self._storage_options,
                progress=self._on_progress, model=self.name, cancel=self._cancel,
                refresh=refresh,
            )
        except ModelCacheError as error:
            raise error.with_model(self.name) from None

    def _run(self, attempt: _Attempt) -> None:
        model: Any = None
        error: BaseException | None = None
        timings: dict[str, float | None] = {}
        fetched: Fetched | None = None
        try:
            started = time.monotonic()
            fetched = self._fetch(self._sources, self._sha256)
            timings["fetch_s"] = round(time.monotonic() - started, 4)
            with self._cond:
                if self._attempt is attempt:
                    self._state = State.LOADING
                    self._cache_hit = fetched.cache_hit
                    self._bytes_total = fetched.size
                    self._bytes_done = fetched.size or 0
                    self._timings.update(timings)
            model = self._load(fetched, timings, self._sources[0])
        except ModelCacheError as failure:
            error = failure
        except Exception as failure:  # a bug outside the loader: still a clear LoadError
            error = LoadError(f"{type(failure).__name__}: {failure}", model=self.name,
                              source=self.source)
            error.__cause__ = failure
        with self._cond:
            if self._attempt is not attempt:
                return  # unloaded or closed while working: drop the result
            attempt.done = True
            self._timings.update(timings)
            if error is None:
                self._model = model
                self._path = fetched.path if fetched else None
                self._loaded_sha256 = fetched.sha256 if fetched else None
                self._state = State.READY
                self._last_used = time.monotonic()
                log.info("model %s ready (%s)", self.name, _describe_timings(self._timings))
            else:
                self._state = State.FAILED
                self._error = error
                self._failed_at = time.monotonic()
                log.warning("model %s failed: %s", self.name, error)
            self._notify()
        if error is None and self.idle_unload:
            self._start_idle_watch()

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
                raise LoadError(f"warmup failed: {type(error).__name__}: {error}",
                                model=self.name, source=source.redacted) from error
            timings["warmup_s"] = round(time.monotonic() - started, 4)
        return model

    def _call_loader(self, path: Path, source: Source) -> Any:
        from .loaders import default_loader

        try:
            if self.loader is not None:
                return self.loader(path)
            return default_loader(path, self.device)
        except ModelCacheError:
            raise
        except Exception as error:
            raise LoadError(f"loading {path.name} failed: {type(error).__name__}: {error}",
                            model=self.name, source=source.redacted) from error

    def _apply_quantization(self, model: Any, method: str, fetched: Fetched, source: Source) -> Any:
        from .quantize import quantize_model

        try:
            quantized, info = quantize_model(
                model, method, name=self.name, source=source.redacted, cache=self.cache,
                source_sha256=fetched.sha256,
            )
        except ModelCacheError:
            raise
        except Exception as error:
            raise LoadError(f"{method} quantization failed: {type(error).__name__}: {error}",
                            model=self.name, source=source.redacted) from error
        self._extra["quantization"] = info
        return quantized

    def _notify(self) -> None:
        """Wake every waiter (threads and coroutines). Called with the lock held."""
        self._cond.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        for wake in waiters:
            try:
                wake()
            except RuntimeError:  # the waiter's event loop is closed
                pass

    # -- unloading, idle, reload --------------------------------------------------------------

    def unload(self) -> None:
        """Drop the loaded object (memory is freed once callers drop theirs); a later get() loads again."""
        with self._cond:
            had_model = self._model is not None
            self._model = None
            if self._attempt is not None and not self._attempt.done:
                self._attempt.done = True  # the running attempt's result will be dropped
                self._attempt = None
                self._notify()
            if self._state is not State.NOT_LOADED or had_model:
                self._state = State.UNLOADED
            path = self._path
        if had_model:
            self._bytes_freed = _free_memory()
            log.info("model %s unloaded (%s freed)", self.name, _human(self._bytes_freed))
        if path is not None:
            cache = self.cache
            if path.parent.parent == cache.path:
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
        assert self.idle_unload is not None
        interval = min(1.0, self.idle_unload / 4)
        while not self._closed.wait(interval):
            with self._cond:
                if self._state is not State.READY:
                    return
                idle = time.monotonic() - self._last_used
                if idle < self.idle_unload:
                    continue
            log.info("model %s idle for %.0fs: unloading", self.name, idle)
            self.unload()
            return

    def reload(self, source: SourceLike | Sequence[SourceLike] | None = None,
               sha256: str | None = None) -> None:
        """Load a new version beside the current one and swap atomically once it is READY.

        ``get()`` keeps returning the current object meanwhile. If the new version fails, the
        current one keeps serving and the error shows in ``status()``. Returns at once.
        """
        from .cache import normalize_sha256

        sources = parse_sources(source, self._storage_options) if source is not None else None
        digest = normalize_sha256(sha256)
        with self._cond:
            if self._state is not State.READY:
                if sources is not None:
                    self._sources = sources
                    self._sha256 = digest
                self._begin(retry_now=True)
                return
            if self._reload_thread is not None and self._reload_thread.is_alive():
                raise RuntimeError(f"{self.name}: a reload is already under way")
            self._reload = {"state": "fetching", "source": (sources or self._sources)[0].redacted,
                            "error": None, "started": time.time()}
            thread = threading.Thread(
                target=self._run_reload,
                args=(sources or self._sources, digest if sources else (digest or self._sha256),
                      sources is None and digest is None),
                name=f"modelcache-reload-{self.name}", daemon=True,
            )
            self._reload_thread = thread
            thread.start()

    def _run_reload(self, sources: list[Source], sha256: str | None, refresh: bool) -> None:
        assert self._reload is not None
        report = self._reload
        timings: dict[str, float | None] = {}
        try:
            started = time.monotonic()
            fetched = self._fetch(sources, sha256, refresh=refresh)
            timings["fetch_s"] = round(time.monotonic() - started, 4)
            report["state"] = "loading"
            model = self._load(fetched, timings, sources[0])
        except Exception as error:
            report.update(state="failed", error=str(error), finished=time.time())
            log.warning("model %s: reload failed, still serving the current version: %s",
                        self.name, error)
            return
        with self._cond:
            if self._state is not State.READY or self._closed.is_set():
                report.update(state="dropped", finished=time.time())
                return
            old = self._model
            self._model = model
            self._sources, self._sha256 = sources, sha256
            self._path, self._loaded_sha256 = fetched.path, fetched.sha256
            self._cache_hit = fetched.cache_hit
            self._bytes_total = self._bytes_done = fetched.size or 0
            self._timings.update({"fetch_s": None, "load_s": None, "quantize_s": None,
                                  "warmup_s": None, **timings})
            report.update(state="ready", finished=time.time())
        del old
        gc.collect()
        log.info("model %s reloaded", self.name)

    def close(self, timeout: float = 10.0) -> None:
        """Stop background work (a running download is cancelled) and unload."""
        self._closed.set()
        self._cancel.set()
        with self._cond:
            attempt = self._attempt
        threads = [attempt.thread if attempt else None, self._reload_thread, self._idle_thread]
        for thread in threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        self.unload()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: state, progress, timings, error (all redacted)."""
        with self._cond:
            error = self._error
            reload = dict(self._reload) if self._reload else None
            status: dict[str, Any] = {
                "name": self.name,
                "state": self._state.value,
                "strategy": self.strategy.value,
                "source": self.source,
                "bytes_total": self._bytes_total,
                "bytes_done": self._bytes_done,
                "cache_hit": self._cache_hit,
                "quantize": self.quantize,
                "timings": dict(self._timings),
                "error": None,
                "required": self.required,
                "device": self.device,
                "sha256": self._loaded_sha256 or self._sha256,
                "path": str(self._path) if self._path else None,
                "idle_unload": self.idle_unload,
                "idle_s": round(time.monotonic() - self._last_used, 3)
                if self._state is State.READY else None,
                "bytes_freed": self._bytes_freed,
                "reload": reload,
            }
            status.update(self._extra)
        if error is not None:
            status["error"] = self._scrub(f"{type(error).__name__}: {error}")
        elif reload and reload.get("state") == "failed":
            status["error"] = self._scrub(f"reload failed: {reload['error']}")
        if reload and reload.get("error"):
            reload["error"] = self._scrub(reload["error"])
        return status

    def _scrub(self, text: str) -> str:
        for source in self._sources:
            text = source.scrub(text)
        return text


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe_timings(timings: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in timings.items() if v is not None)


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _free_memory() -> int | None:
    """Collect garbage and give freed heap back to the OS; the resident bytes released."""
    before = _rss()
    gc.collect()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
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
