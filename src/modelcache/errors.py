"""The exceptions modelcache raises.

The hierarchy::

    ModelCacheError
    ├── SourceError            unreachable, not found, refused, bad URL or unknown scheme
    ├── IntegrityError         hash or size mismatch
    ├── NotCachedError         offline (or nothing cached) and the entry is missing
    ├── LockTimeoutError       another writer held the lock without progress (a TimeoutError)
    ├── InsufficientSpaceError the cache's disk cannot hold the download
    ├── LoadError              the loader, quantization or warmup failed (cause chained)
    └── NotReadyError          get() timed out before READY (TimeoutError too)

Every error carries the model name and the redacted source it is about, puts both in its
message, and pickles (errors from background threads and worker processes cross boundaries).
A handle attaches them once, where it calls the cache and the loader (:func:`in_context`);
``status()`` and log lines show a very long message cut short (:func:`shorten`) while the
exception keeps the whole text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = [
    "InsufficientSpaceError",
    "IntegrityError",
    "LoadError",
    "LockTimeoutError",
    "ModelCacheError",
    "NotCachedError",
    "NotReadyError",
    "SourceError",
]


class ModelCacheError(Exception):
    """Base of every modelcache error.

    Attributes:
        reason: what went wrong, without the model and source.
        model: the model's name, or ``None`` when the call had none (a bare ``Cache.fetch``).
        source: the source, with credentials redacted.
    """

    def __init__(self, reason: str, *, model: str | None = None, source: str | None = None) -> None:
        self.reason = reason
        self.model = model
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        about = []
        if self.model:
            about.append(f"model {self.model!r}")
        if self.source:
            about.append(f"source {self.source}")
        return f"{', '.join(about)}: {self.reason}" if about else self.reason

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), dict(self.__dict__)))

    def with_model(self, model: str | None) -> ModelCacheError:
        """Name the model this error is about (used when a handle re-raises a cache error)."""
        return self.about(model=model)

    def about(self, *, model: str | None = None, source: str | None = None) -> ModelCacheError:
        """Name the model and the (redacted) source, where the error does not yet: called once,
        at the boundary that knows them, so the layers below need not carry them."""
        if model and not self.model:
            self.model = model
        if source and not self.source:
            self.source = source
        self.args = (self._message(),)
        return self


def _rebuild(cls: type[ModelCacheError], state: dict[str, Any]) -> ModelCacheError:
    error = cls.__new__(cls)
    error.__dict__.update(state)
    Exception.__init__(error, error._message())
    return error


class SourceError(ModelCacheError):
    """The source could not be read: unreachable, not found, refused, bad URL or unknown scheme.

    ``attempts`` lists, for a chain of mirrors, each source tried and why it failed.
    """

    def __init__(
        self,
        reason: str,
        *,
        model: str | None = None,
        source: str | None = None,
        status: int | None = None,
        attempts: list[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.attempts = attempts or []
        super().__init__(reason, model=model, source=source)

    def _message(self) -> str:
        message = super()._message()
        if len(self.attempts) > 1:
            tried = "".join(f"\n  - {src}: {why}" for src, why in self.attempts)
            message += f"\ntried:{tried}"
        return message


class IntegrityError(ModelCacheError):
    """The bytes are not the expected ones (sha256 or size mismatch); nothing was cached."""


class NotCachedError(ModelCacheError):
    """The entry is not in any cache layer and the network may not be used."""

    def _message(self) -> str:
        hint = f" (pre-load it with: modelcache fetch {self.source})" if self.source else ""
        return super()._message() + hint


class LockTimeoutError(ModelCacheError, TimeoutError):
    """Another writer held the entry's lock and made no progress for too long."""


class InsufficientSpaceError(ModelCacheError, OSError):
    """The cache's filesystem has too little free space for the download."""


class LoadError(ModelCacheError):
    """The loader, the quantization or the warmup failed (or anything else unexpected while a
    handle fetched and loaded); the cause is chained."""


class NotReadyError(ModelCacheError, TimeoutError):
    """The model did not become READY within the timeout."""


SHOWN_CHARACTERS = 2000
"""How much of an error message ``status()`` and log lines show (see :func:`shorten`)."""


def shorten(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """``text`` cut to ``limit`` characters plus a note of how many more there were.

    For ``status()`` and log lines: a state-dict mismatch names every key (hundreds of KB for a
    large model), which would fill a log or a ``/ready`` body. The exception keeps the full text.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def in_context(
    error: BaseException,
    *,
    model: str,
    source: str,
    doing: str,
    scrub: Callable[[str], str] = str,
) -> ModelCacheError:
    """``error`` as a modelcache error naming ``model`` and ``source``: the one place a handle
    attaches them, where it calls the cache and the loader.

    A modelcache error keeps its class and message and gains the model and source it lacks
    (:meth:`ModelCacheError.about`); it is returned itself. Anything else becomes a
    :class:`LoadError` ``"<doing> failed: <Type>: <message>"`` (the message passed through
    ``scrub``, which masks credentials) whose ``__cause__`` is ``error``.
    """
    if isinstance(error, ModelCacheError):
        return error.about(model=model, source=source)
    wrapped = LoadError(
        f"{doing} failed: {type(error).__name__}: {scrub(str(error))}", model=model, source=source
    )
    wrapped.__cause__ = error
    return wrapped
