"""The load pipeline: fetch -> load -> quantize -> warmup, shared by an attempt and ``reload()``.

A cold ``get()`` goes down the layers once (the cache fetches, the loader loads, the quantizer
quantizes, the warmup runs) and comes back once with a :class:`Loaded`. During a long
download, a thread of the run imports what the loader will need (:mod:`._imports`), and the
load waits for it.

Every error leaves through one boundary, :meth:`LoadRun._step`, which names the model and the
source the bytes came from (:func:`~modelcache.errors.in_context`): a run raises only modelcache
errors.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from modelcache._sources import Source
from modelcache.cache import Cache, Fetched
from modelcache.errors import in_context

from . import _holds
from ._imports import ImportAhead
from ._status import Timings, empty_timings

__all__ = ["LoadRun", "Loaded", "Options"]

T = TypeVar("T")
Progress = Callable[[int, "int | None"], None]


class Options(Protocol):
    """What the pipeline reads of its handle, each when the step that needs it runs."""

    name: str
    loader: Callable[[Path], Any] | None
    warmup: Callable[[Any], None] | None
    device: str

    @property
    def cache(self) -> Cache: ...

    @property
    def quantize(self) -> str | None: ...


@dataclass(frozen=True)
class Loaded:
    """What a run produced: the model, the cached file it came from (and the cache that holds
    it), and how long it took."""

    model: Any
    fetched: Fetched
    cache: Cache
    timings: Timings
    quantization: dict[str, Any] | None


class LoadRun:
    """One run of the pipeline for one handle, from ``sources`` (mirrors, tried in order).

    ``timings`` fills in as the steps finish (also when a later step fails). ``progress`` and
    ``cancel`` are handed to the cache's download.

    The fetched file is held (:mod:`._holds`: the cache may not evict it) from the fetch on;
    whoever drops the run's result instead of serving it calls :meth:`let_go`.
    """

    def __init__(
        self,
        options: Options,
        sources: Sequence[Source],
        sha256: str | None,
        storage_options: Mapping[str, Any] | None,
        *,
        refresh: bool = False,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self._options = options
        self._sources = list(sources)
        self._sha256 = sha256
        self._storage_options = storage_options
        self._refresh = refresh
        self._progress = progress
        self._cancel = cancel
        self._source = self._sources[0]  # what errors name: the serving mirror once fetched
        self._cache: Cache | None = None
        self._held: Fetched | None = None
        self._imports: ImportAhead | None = None
        self.timings: Timings = empty_timings()

    def fetch(self, *, hold: bool = True) -> Fetched:
        """Make sure the file(s) are in the cache (the handle's one call into the cache).

        ``hold=False``: the file is not counted as served by a handle (``ModelHandle.fetch``
        hands the path to its caller, and the cache's lease stays, as with ``Cache.fetch``); it is
        not loaded, so the loader's imports are not started either.
        """
        started = time.monotonic()
        progress = self._import_ahead(self._progress) if hold else self._progress
        with self._step("fetch"):
            self._cache = self._options.cache
            fetched = self._cache.fetch_details(
                [s.url for s in self._sources],
                self._sha256,
                self._storage_options,
                progress=progress,
                model=self._options.name,
                cancel=self._cancel,
                refresh=self._refresh,
            )
        if hold:
            _holds.hold(fetched.path)
            self._held = fetched
        self.timings["fetch_s"] = round(time.monotonic() - started, 4)
        self._source = next(
            (s for s in self._sources if s.redacted == fetched.source), self._sources[0]
        )
        return fetched

    def let_go(self) -> None:
        """The result is not served (failed, cancelled, superseded): the cache may evict the
        fetched entry again once no handle of this process serves it."""
        fetched, self._held = self._held, None
        if fetched is not None:
            assert self._cache is not None
            _holds.let_go(self._cache, fetched.path, fetched.key)

    def _import_ahead(self, progress: Progress | None) -> Progress | None:
        """``progress``, also telling :class:`ImportAhead` how the download goes (when the
        loader's imports are known: :func:`~modelcache.loaders.preparation`)."""
        from modelcache.loaders import preparation

        prepare = preparation(self._options.loader, self._sources[0].url)
        if prepare is None:
            return progress
        imports = self._imports = ImportAhead(prepare, self._options.name)
        if progress is None:
            return imports.progress

        def both(done: int, total: int | None) -> None:
            imports.progress(done, total)
            progress(done, total)

        return both

    def load(self, fetched: Fetched) -> Loaded:
        """Load the fetched file, quantize the model if asked, and warm it up."""
        from modelcache import _prefault

        if self._imports is not None:
            self._imports.wait()  # one thread imports at a time: the loader's imports are done
        quantization: dict[str, Any] | None = None
        with self._step("quantization"):
            method = self._options.quantize  # an invalid $MODELCACHE_QUANTIZE raises here
        with _prefault.deferred() if method is not None else contextlib.nullcontext():
            # quantizing: the float pages are not read in (the int8 weights replace them)
            model = self._timed(
                "load_s", f"loading {fetched.path.name}", self._call_loader, fetched
            )
        if method is not None:
            model, quantization = self._timed(
                "quantize_s", f"{method} quantization", self._quantize, model, method, fetched
            )
        warmup = self._options.warmup
        if warmup is not None:
            self._timed("warmup_s", "warmup", warmup, model)
        assert self._cache is not None
        return Loaded(model, fetched, self._cache, self.timings.copy(), quantization)

    @contextlib.contextmanager
    def _step(self, doing: str) -> Iterator[None]:
        """The boundary: an error raised inside names the model and the source, once."""
        try:
            yield
        except Exception as failure:
            source = self._source
            error = in_context(
                failure,
                model=self._options.name,
                source=source.redacted,
                doing=doing,
                scrub=source.scrub,
            )
            if error is failure:
                raise
            raise error from failure

    def _timed(
        self,
        key: Literal["load_s", "quantize_s", "warmup_s"],
        doing: str,
        step: Callable[..., T],
        *args: Any,
    ) -> T:
        started = time.monotonic()
        with self._step(doing):
            result = step(*args)
        self.timings[key] = round(time.monotonic() - started, 4)
        return result

    def _call_loader(self, fetched: Fetched) -> Any:
        if self._options.loader is not None:
            return self._options.loader(fetched.path)
        from modelcache.loaders import default_loader

        return default_loader(fetched.path, self._options.device)

    def _quantize(self, model: Any, method: str, fetched: Fetched) -> tuple[Any, dict[str, Any]]:
        from modelcache.quantize import quantize_model

        assert self._cache is not None
        return quantize_model(
            model,
            method,
            name=self._options.name,
            source=self._source.redacted,
            cache=self._cache,
            source_sha256=fetched.sha256,
            path=fetched.path,
        )
