"""``status()``: what a handle reports, as typed dicts, and the one function that builds it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from modelcache.errors import shorten

from ._state import State

__all__ = ["HandleStatus", "Progress", "ReloadStatus", "Timings", "empty_timings", "handle_status"]


class Timings(TypedDict):
    """Seconds spent in each step of the last load (``None``: not run, or not finished)."""

    fetch_s: float | None
    load_s: float | None
    quantize_s: float | None
    warmup_s: float | None


def empty_timings() -> Timings:
    """Timings of a load that has not run yet."""
    return {"fetch_s": None, "load_s": None, "quantize_s": None, "warmup_s": None}


ReloadState = Literal["fetching", "loading", "ready", "failed", "cancelled"]


class ReloadStatus(TypedDict):
    """``status()["reload"]``: the last :meth:`~modelcache.ModelHandle.reload`."""

    state: ReloadState
    source: str
    bytes_done: int
    bytes_total: int | None
    timings: Timings
    error: str | None
    started: float
    finished: float | None


class _HandleStatus(TypedDict):
    name: str
    state: str
    strategy: str | None
    source: str
    served_from: str | None
    bytes_total: int | None
    bytes_done: int
    cache_hit: bool | None
    quantize: str | None
    timings: Timings
    error: str | None
    required: bool
    device: str
    sha256: str | None
    path: str | None
    idle_unload: float | None
    idle_unloaded: bool
    idle_s: float | None
    bytes_freed: int | None
    reload: ReloadStatus | None


class HandleStatus(_HandleStatus, total=False):
    """:meth:`ModelHandle.status() <modelcache.ModelHandle.status>`: JSON-serialisable, every
    source and error redacted, ``error`` cut to :data:`modelcache.errors.SHOWN_CHARACTERS`.

    ``strategy`` and ``quantize`` show the values in force (an invalid environment value
    shows as ``"invalid: ..."``); ``served_from`` and ``idle_s`` are set while READY;
    ``quantization`` is there once a quantized version was loaded.
    """

    quantization: dict[str, Any]


@dataclass
class Progress:
    """The bytes and timings of the attempt (or reload) under way, or of the last one."""

    bytes_done: int = 0
    bytes_total: int | None = None
    cache_hit: bool | None = None
    timings: Timings = field(default_factory=empty_timings)

    def update(self, done: int, total: int | None) -> None:
        """Bytes arrived (the cache's progress callback)."""
        self.bytes_done, self.bytes_total = done, total

    def fetched(self, size: int | None, cache_hit: bool, timings: Timings) -> None:
        """The file is in the cache: all of its bytes are there."""
        self.bytes_total, self.bytes_done, self.cache_hit = size, size or 0, cache_hit
        self.timings.update(timings)


def handle_status(
    *,
    name: str,
    state: State,
    strategy: str | None,
    quantize: str | None,
    source: str,
    served_from: str | None,
    progress: Progress,
    error: str | None,
    required: bool,
    device: str,
    sha256: str | None,
    path: Path | None,
    idle_unload: float | None,
    idle_unloaded: bool,
    last_used: float,
    bytes_freed: int | None,
    reload: ReloadStatus | None,
    quantization: dict[str, Any] | None,
) -> HandleStatus:
    """The status of one handle; ``error`` and ``reload["error"]`` come redacted and whole,
    and are shown cut short (:func:`~modelcache.errors.shorten`)."""
    ready = state is State.READY
    if reload is not None and reload["error"] is not None:
        reload = {**reload, "error": shorten(reload["error"])}
    if error is not None:
        error = shorten(error)
    elif reload is not None and reload["state"] == "failed":
        error = f"reload failed: {reload['error']}"
    status: HandleStatus = {
        "name": name,
        "state": state.value,
        "strategy": strategy,
        "source": source,
        "served_from": served_from if ready else None,
        "bytes_total": progress.bytes_total,
        "bytes_done": progress.bytes_done,
        "cache_hit": progress.cache_hit,
        "quantize": quantize,
        "timings": progress.timings.copy(),
        "error": error,
        "required": required,
        "device": device,
        "sha256": sha256,
        "path": str(path) if path else None,
        "idle_unload": idle_unload,
        "idle_unloaded": idle_unloaded and not ready,
        "idle_s": round(time.monotonic() - last_used, 3) if ready else None,
        "bytes_freed": bytes_freed,
        "reload": reload,
    }
    if quantization is not None:
        status["quantization"] = quantization
    return status
