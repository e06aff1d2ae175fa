"""A cold load imports the loader's modules during the download only when the download is long."""

from __future__ import annotations

import threading

from modelcache.handle._imports import AHEAD_OF, MEASURED_OVER, ImportAhead

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ahead(clock: Clock) -> tuple[ImportAhead, threading.Event]:
    imported = threading.Event()
    return ImportAhead(imported.set, "model", clock=clock), imported


def test_a_download_with_seconds_to_go_starts_the_imports_and_the_load_waits_for_them() -> None:
    clock = Clock()
    ahead, imported = _ahead(clock)
    ahead.progress(0, 1024 * MiB)
    clock.now += MEASURED_OVER
    ahead.progress(50 * MiB, 1024 * MiB)  # 200 MiB/s: about 4.9 s to go
    ahead.wait()
    assert imported.is_set()


def test_a_download_about_as_short_as_the_import_leaves_the_imports_to_the_loader() -> None:
    clock = Clock()
    ahead, imported = _ahead(clock)
    ahead.progress(0, 1024 * MiB)
    for step in range(1, 5):  # 800 MiB/s: 1.3 s in all
        clock.now += MEASURED_OVER
        ahead.progress(step * 200 * MiB, 1024 * MiB)
    ahead.wait()
    assert not imported.is_set()


def test_the_rate_is_not_judged_on_the_first_instants() -> None:
    clock = Clock()
    ahead, imported = _ahead(clock)
    ahead.progress(0, 1024 * MiB)
    clock.now += MEASURED_OVER / 10
    ahead.progress(64 * 1024, 1024 * MiB)  # slow start: it would project minutes
    ahead.wait()
    assert not imported.is_set()


def test_without_a_size_the_imports_start_once_the_download_has_lasted_long() -> None:
    clock = Clock()
    ahead, imported = _ahead(clock)
    ahead.progress(0, None)
    clock.now += AHEAD_OF / 2
    ahead.progress(100 * MiB, None)
    assert not imported.is_set()
    clock.now += AHEAD_OF / 2
    ahead.progress(200 * MiB, None)
    ahead.wait()
    assert imported.is_set()


def test_a_failing_import_is_left_to_the_loader_to_report() -> None:
    clock = Clock()
    calls: list[int] = []

    def prepare() -> None:
        calls.append(1)
        raise ImportError("No module named 'torch'")

    ahead = ImportAhead(prepare, "model", clock=clock)
    ahead.progress(0, 1024 * MiB)
    clock.now += 1.0
    ahead.progress(10 * MiB, 1024 * MiB)
    ahead.progress(20 * MiB, 1024 * MiB)  # started once, not again
    ahead.wait()
    assert calls == [1]
