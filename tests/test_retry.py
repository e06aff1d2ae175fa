"""One retry policy for transfers and metadata calls: statuses, Retry-After, deadline, cancel."""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import replace
from email.utils import formatdate
from pathlib import Path

import pytest
from conftest import FAST, make_payload

from modelcache import Cache, SourceError
from modelcache._filesystems import retrying
from modelcache._retry import (
    RETRYABLE_STATUSES,
    Cancelled,
    FatalError,
    TransientError,
    call_with_retries,
    parse_retry_after,
)
from modelcache.testing import ModelServer

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 3 ", 3.0),
        ("0.5", 0.5),
        ("-5", 0.0),  # never a negative wait
        (formatdate(NOW + 90, usegmt=True), 90.0),  # an HTTP-date
        (formatdate(NOW - 90, usegmt=True), 0.0),  # a date already past
        ("Tue, 14 Nov 2023 22:13:50", 30.0),  # a date without its zone is GMT
        (b"7", 7.0),
        ("soon", None),
        ("nan", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_in_both_forms(value: object, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_one_set_of_retryable_statuses() -> None:
    assert {408, 429, 500, 502, 503, 504} <= RETRYABLE_STATUSES
    assert not {400, 401, 403, 404, 410, 416, 501, 505} & RETRYABLE_STATUSES


@pytest.mark.parametrize(("status", "requests"), [(504, 2), (501, 1)])
def test_the_engine_retries_exactly_the_retryable_statuses(
    cache: Cache, model_server: ModelServer, status: int, requests: int
) -> None:
    data = make_payload(1000)
    url = model_server.add("status.bin", data)
    model_server.fail_next("status.bin", times=1, status=status)
    if requests == 1:
        with pytest.raises(SourceError, match=str(status)):
            cache.fetch(url)
    else:
        assert cache.fetch(url).read_bytes() == data
    assert model_server.count("status.bin")[0] == requests


def test_a_retry_after_date_is_honoured(cache: Cache, model_server: ModelServer) -> None:
    data = make_payload(1000)
    url = model_server.add("date.bin", data)
    later = formatdate(time.time() + 2, usegmt=True)  # whole seconds: between 1 and 2 s from now
    model_server.fail_next("date.bin", times=1, status=503, headers={"Retry-After": later})
    started = time.monotonic()
    assert cache.fetch(url).read_bytes() == data
    assert time.monotonic() - started >= 0.9  # FAST's own backoff is 0.01 s


def test_a_retry_after_past_the_deadline_ends_at_the_deadline(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    url = model_server.add("later.bin", make_payload(1000))
    model_server.fail_next("later.bin", times=100, status=503, headers={"Retry-After": "3600"})
    cache = Cache(modelcache_home, transfer=replace(FAST, retries=100, deadline=2.0))
    started = time.monotonic()
    with pytest.raises(SourceError, match="gave up"):
        cache.fetch(url)
    assert time.monotonic() - started < 5.0


def test_cancel_ends_a_wait_for_retry_at_once(
    modelcache_home: Path, model_server: ModelServer
) -> None:
    url = model_server.add("busy.bin", make_payload(1000))
    model_server.fail_next("busy.bin", times=100, status=429, headers={"Retry-After": "30"})
    cache = Cache(modelcache_home, transfer=replace(FAST, deadline=60.0))
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(SourceError, match="cancelled"):
        cache.fetch(url, cancel=cancel)
    assert time.monotonic() - started < 3.0


# -- metadata calls go through the same policy ----------------------------------------------------


class Flaky:
    """A call that fails ``failures`` times with ``error``, then answers."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "listing"


def test_a_metadata_call_is_retried_like_a_transfer() -> None:
    reset = ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
    call = Flaky(FAST.retries, reset)
    assert retrying(call, FAST) == "listing"
    assert call.calls == FAST.retries + 1

    call = Flaky(FAST.retries + 1, reset)
    with pytest.raises(FatalError, match=r"gave up after 4 attempts"):
        retrying(call, FAST)
    assert call.calls == FAST.retries + 1


def test_a_refusal_of_a_metadata_call_is_not_retried() -> None:
    call = Flaky(10, PermissionError("403 Forbidden"))
    with pytest.raises(FatalError, match="refused") as caught:
        retrying(call, FAST)
    assert caught.value.status == 403
    assert call.calls == 1


def test_a_metadata_call_honours_retry_after_and_cancel() -> None:
    busy = TransientError("HTTP 429", retry_after=30.0)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        call_with_retries(Flaky(10, busy), FAST, classify=lambda e: busy, cancel=cancel)
    assert time.monotonic() - started < 2.0


def test_the_deadline_counts_from_the_last_progress() -> None:
    slow_failure = TransientError("HTTP 503")

    def fails_slowly() -> None:
        time.sleep(0.2)
        raise slow_failure

    settings = replace(FAST, retries=1000, deadline=1.0)
    started = time.monotonic()
    with pytest.raises(FatalError, match="gave up"):
        call_with_retries(fails_slowly, settings, classify=lambda e: slow_failure)
    assert 1.0 <= time.monotonic() - started < 2.0
