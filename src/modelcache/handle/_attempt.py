"""One attempt: a fetch-and-load run in its own worker thread, and everyone waiting for it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

__all__ = ["Attempt"]


class Attempt:
    """One run of a handle's worker thread. Any number of threads and coroutines wait for it
    to end; :meth:`end` wakes them all (how it ended is the state machine's to say)."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.thread: threading.Thread | None = None
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._wakers: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        """Ended: finished, failed, or abandoned by the state machine."""
        return self._ended.is_set()

    def end(self) -> None:
        """Mark the attempt ended and wake every waiter (again: nothing happens)."""
        with self._lock:
            self._ended.set()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            with contextlib.suppress(RuntimeError):  # the waiter's event loop is closed
                wake()

    def wait(self, timeout: float | None) -> bool:
        """Block until the attempt ends; False when ``timeout`` seconds passed first."""
        return self._ended.wait(None if timeout is None else max(0.0, timeout))

    async def wait_async(self, timeout: float | None) -> bool:
        """:meth:`wait` for coroutines: the event loop keeps turning meanwhile."""
        import asyncio  # the caller's loop imported it already; 15 ms for everyone else

        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            loop.call_soon_threadsafe(_resolve, future)

        with self._lock:
            if self._ended.is_set():
                return True
            self._wakers.append(wake)
        try:
            await asyncio.wait_for(future, None if timeout is None else max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                if wake in self._wakers:
                    self._wakers.remove(wake)
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
