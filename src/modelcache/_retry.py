"""One retry policy for every remote call: transfers and metadata calls (listings, HEADs) alike.

- what is worth retrying: :class:`TransientError` (a connection error, a timeout, a status in
  :data:`RETRYABLE_STATUSES`); anything else is a :class:`FatalError`;
- how long to wait: exponential backoff with jitter, or longer when the origin's
  ``Retry-After`` asks (:func:`parse_retry_after` reads both of its forms);
- when to give up: after ``retries`` failures with no progress in between, or once ``deadline``
  seconds passed with no progress, so an origin that keeps failing ends within about a minute
  with the defaults (a :class:`FatalError` that says so);
- cancellation: a wait ends at once when the caller's ``cancel`` event is set (:class:`Cancelled`).

This module is a leaf: it knows nothing of HTTP clients or stores; they sort their failures
into the two kinds and let :class:`RetryBudget` or :func:`call_with_retries` do the rest.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = [
    "RETRYABLE_STATUSES",
    "Cancelled",
    "FatalError",
    "RetryBudget",
    "RetrySettings",
    "TransientError",
    "call_with_retries",
    "parse_retry_after",
    "retryable_status",
]

T = TypeVar("T")

#: HTTP statuses worth another attempt: timeouts, "too early", throttling, and the server-side
#: failures that pass (a gateway or its upstream down or overloaded). 501 and 505 say the request
#: can never work; 520-524 are the CDN-to-origin failures Cloudflare reports, as common in front
#: of model hosts as 502-504.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524})


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying (one of :data:`RETRYABLE_STATUSES`)."""
    return status in RETRYABLE_STATUSES


def parse_retry_after(value: object, *, now: float | None = None) -> float | None:
    """The seconds a ``Retry-After`` header value asks to wait, or ``None``.

    Both forms are read: delta-seconds (``"120"``) and an HTTP-date
    (``"Wed, 21 Oct 2015 07:28:00 GMT"``, counted from ``now``, default the current time). A
    date in the past means ``0.0``; a missing or unreadable value means ``None``.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        from email.utils import parsedate_to_datetime  # 15 ms to import: only for HTTP-dates

        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:  # HTTP-dates are GMT; a date without a zone is read so
            from datetime import timezone

            moment = moment.replace(tzinfo=timezone.utc)
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


class TransientError(Exception):
    """A failure worth retrying (a connection error, a timeout, a retryable status).

    ``retry_after``: the seconds the origin asked to wait, if it said.
    """

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class FatalError(Exception):
    """A failure that retrying cannot fix (401, 403, 404, a bad URL, retries spent, ...).

    ``status``: the HTTP status behind it, if any; ``challenge``: a 401's ``WWW-Authenticate``
    (how to get a token), which travels with the error as other responses come in meanwhile.
    """

    def __init__(
        self, reason: str, status: int | None = None, *, challenge: str | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.challenge = challenge


class Cancelled(FatalError):
    """The caller cancelled while a call was running or waiting to retry."""

    def __init__(self) -> None:
        super().__init__("cancelled")

    def __reduce__(self) -> tuple[type[Cancelled], tuple[()]]:
        return (Cancelled, ())


class RetrySettings(Protocol):
    """The knobs of the policy (``TransferOptions`` has them)."""

    @property
    def retries(self) -> int: ...

    @property
    def backoff(self) -> float: ...

    @property
    def max_backoff(self) -> float: ...

    @property
    def deadline(self) -> float: ...


class RetryBudget:
    """The failures one operation may still afford; shared by the threads of one download.

    Both limits count from the last progress (:meth:`progressed`), so a long download that
    meets an occasional error never runs out, while one that stops moving gives up after
    ``retries`` failures or ``deadline`` seconds, whichever comes first.
    """

    def __init__(self, settings: RetrySettings, cancel: threading.Event | None = None) -> None:
        self._settings = settings
        self._cancel = cancel if cancel is not None else threading.Event()
        self._lock = threading.Lock()
        self._failures = 0
        self._last_progress = time.monotonic()

    def progressed(self) -> None:
        """Some bytes arrived: the count of failures and the deadline start again."""
        with self._lock:
            self._failures = 0
            self._last_progress = time.monotonic()

    def wait(self, error: TransientError) -> None:
        """Sleep before the next attempt after ``error``.

        Raises :class:`FatalError` (``"... (gave up after N attempts in S s)"``) when the budget
        is spent, and :class:`Cancelled` when ``cancel`` is set meanwhile.
        """
        with self._lock:
            self._failures += 1
            failures = self._failures
            idle = time.monotonic() - self._last_progress
        settings = self._settings
        remaining = settings.deadline - idle
        if failures > settings.retries or remaining <= 0:
            raise FatalError(f"{error} (gave up after {failures} attempts in {idle:.1f}s)")
        delay = _backoff(settings, failures)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)  # honoured up to the deadline
        if self._cancel.wait(min(delay, remaining)):
            raise Cancelled


def _backoff(settings: RetrySettings, failures: int) -> float:
    """The pause after the ``failures``-th failure in a row: doubling, capped, jittered +-50%."""
    delay: float = min(settings.max_backoff, settings.backoff * 2 ** (failures - 1))
    return delay * random.uniform(0.5, 1.5)


def call_with_retries(
    call: Callable[[], T],
    settings: RetrySettings,
    *,
    classify: Callable[[Exception], FatalError | TransientError],
    describe: Callable[[BaseException], str] = str,
    cancel: threading.Event | None = None,
) -> T:
    """Run ``call``, retrying the failures ``classify`` calls transient.

    Raises :class:`FatalError` (its reason passed through ``describe``) when a failure is
    permanent or the budget is spent, and :class:`Cancelled` when ``cancel`` is set.
    """
    budget = RetryBudget(settings, cancel)
    while True:
        try:
            return call()
        except Exception as error:
            sorted_error = classify(error)
            if isinstance(sorted_error, FatalError):
                if isinstance(sorted_error, Cancelled):
                    raise sorted_error from None
                raise FatalError(describe(sorted_error), sorted_error.status) from None
            budget.wait(TransientError(describe(sorted_error), sorted_error.retry_after))
