"""ModelHandle: the public class: a model's configuration and what a caller can ask of it.

The state machine lives in :mod:`._machine`, the load pipeline in :mod:`._pipeline`, and
``status()`` is built by :mod:`._status`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelcache import _config as config
from modelcache._hashing import normalize_sha256
from modelcache._sources import Source, SourceLike, parse_sources
from modelcache.cache import Cache

from ._machine import StateMachine
from ._state import State, Strategy
from ._status import HandleStatus, handle_status

__all__ = ["ModelHandle"]

log = logging.getLogger("modelcache")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_QUANTIZE_METHODS = ("int8",)


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
        for what, value in (("loader", loader), ("warmup", warmup)):
            if value is not None and not callable(value):
                raise TypeError(f"{name}: {what} must be callable, got {type(value).__name__}")
        self.name = name
        self.loader = loader
        self.warmup = warmup
        self.required = required
        self.idle_unload = idle_unload
        self.device = device
        self._strategy = Strategy.parse(strategy)
        self._quantize = _parse_quantize(quantize, name)
        self._cache_arg = cache
        self._storage_options = storage_options
        self._machine = StateMachine(
            self, parse_sources(source, storage_options), normalize_sha256(sha256), storage_options
        )

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
        return Cache() if self._cache_arg is None else Cache(self._cache_arg)

    @property
    def sources(self) -> list[Source]:
        """The sources (mirrors in order)."""
        return list(self._machine.sources)

    @property
    def source(self) -> str:
        """The first source, redacted (safe to show)."""
        return self._machine.sources[0].redacted

    @property
    def sha256(self) -> str | None:
        """The expected sha256, if given."""
        return self._machine.sha256

    @property
    def state(self) -> State:
        """The current :class:`State`."""
        return self._machine.state

    @property
    def ready(self) -> bool:
        """``state is State.READY``."""
        return self._machine.state is State.READY

    @property
    def available(self) -> bool:
        """READY, or unloaded by ``idle_unload`` (the next ``get()`` loads it again).

        This is what :attr:`Registry.ready` counts, so an idle-unloaded model does not take
        the service out of its load balancer, which would keep the request that reloads it away.
        """
        state = self._machine.state
        if state is State.READY:
            return True
        loading = (State.UNLOADED, State.FETCHING, State.LOADING)
        return self._machine.idle_unloaded and state in loading

    @property
    def _failed_at(self) -> float:
        """When the last attempt failed (``time.monotonic()``); ``retry_interval`` counts
        from there."""
        return self._machine.failed_at

    # -- starting and getting -----------------------------------------------------------------

    def start(self) -> None:
        """Start as the strategy says: eager loads now (blocking, raising), background starts a
        daemon thread and returns at once, lazy does nothing (the first ``get()`` loads)."""
        strategy = self.strategy
        if strategy is Strategy.BACKGROUND:
            self.begin_loading()
        elif strategy is Strategy.EAGER:
            self.get()

    def begin_loading(self) -> None:
        """Start fetching and loading in the background unless done or under way; returns at once.

        Unlike ``get()``, this retries at once after a failure (it is an explicit request).
        """
        with self._machine.lock:
            if self._machine.state is not State.READY:
                self._machine.begin(retry_now=True)

    def get(self, timeout: float | None = None) -> Any:
        """The loaded model; the first call (or the first after a failure) starts the work.

        Raises the fetch's own error, :class:`LoadError`, or :class:`NotReadyError` on timeout.
        """
        return self._machine.get(timeout)

    async def aget(self, timeout: float | None = None) -> Any:
        """:meth:`get` for coroutines: waits without blocking the event loop."""
        return await self._machine.aget(timeout)

    def fetch(self) -> Path:
        """Make sure the file(s) are in the cache and return the local ``Path``; loads nothing."""
        with self._machine.lock:
            sources, sha256 = self._machine.sources, self._machine.sha256
        return self._machine.new_run(sources, sha256).fetch(hold=False).path

    # -- unloading, reloading, closing --------------------------------------------------------

    def unload(self) -> None:
        """Drop the loaded object; a later ``get()`` loads again.

        Memory is freed once callers drop their references too: the handle collects garbage
        and hands freed heap back to the OS (``malloc_trim``), and reports the resident bytes
        released as ``status()["bytes_freed"]``. A fetch or load under way is abandoned.
        """
        self._machine.unload()

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
        self._machine.reload(sources, normalize_sha256(sha256))

    def _stop(self) -> None:
        """Ask background work to stop (downloads are cancelled); does not wait."""
        self._machine.stop()

    def close(self, timeout: float | None = None) -> None:
        """Stop background work, wait for its threads, and unload.

        A download under way is cancelled (its part file stays in the cache's ``.tmp`` to be
        resumed; nothing half-written is published). A loader cannot be interrupted: ``close``
        waits up to ``timeout`` seconds (default :attr:`close_timeout`) for it. A later
        ``get()`` starts again.
        """
        deadline = time.monotonic() + (self.close_timeout if timeout is None else timeout)
        for thread in self._machine.stop():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning(
                    "model %s: thread %s still running after close()", self.name, thread.name
                )
        self.unload()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> HandleStatus:
        """A JSON-serialisable snapshot: state, progress, timings, error (all redacted; a long
        error is cut short here and in log lines, while the exception keeps the whole text)."""
        machine = self._machine
        with machine.lock:
            error, job = machine.error, machine.reload_job
            return handle_status(
                name=self.name,
                state=machine.state,
                strategy=_safe(lambda: self.strategy.value),
                quantize=_safe(lambda: self.quantize),
                source=self.source,
                served_from=machine.served_from,
                progress=machine.progress,
                error=None if error is None else machine.scrub(f"{type(error).__name__}: {error}"),
                required=self.required,
                device=self.device,
                sha256=machine.loaded_sha256 or machine.sha256,
                path=machine.path,
                idle_unload=self.idle_unload,
                idle_unloaded=machine.idle_unloaded,
                last_used=machine.last_used,
                bytes_freed=machine.bytes_freed,
                reload=None if job is None else job.report(),
                quantization=machine.quantization,
            )


def _parse_quantize(value: str | None, origin: str) -> str | None:
    if value is None or str(value).strip().lower() == "none":
        return None
    method = str(value).strip().lower()
    if method not in _QUANTIZE_METHODS:
        raise ValueError(f"{origin}: unknown quantize {value!r}; expected None or 'int8'")
    return method


def _safe(read: Callable[[], str | None]) -> str | None:
    """A configuration value for ``status()``; a bad environment value shows as an error text."""
    try:
        return read()
    except ValueError as error:
        return f"invalid: {error}"
