"""``idle_unload``: a daemon thread that unloads a model no ``get()`` asked for in a while."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["IdleWatch"]

log = logging.getLogger("modelcache")


class IdleWatch:
    """Checks a few times per ``idle_unload`` period; ends once the model unloaded, is no
    longer READY, or ``stopped`` is set (the handle closes).

    The callbacks live only as long as the watching thread: nothing here refers back to the
    handle once the watch ends (a dropped handle frees its model at once, without a cycle).
    """

    def __init__(self, name: str, stopped: threading.Event) -> None:
        self._name = name
        self._stopped = stopped
        self.thread: threading.Thread | None = None

    def start(
        self,
        idle_unload: float,
        serving: Callable[[], bool],
        unload_if_idle: Callable[[float], bool],
    ) -> None:
        """Watch, unless a watch is already running."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(
                target=self._watch,
                args=(idle_unload, serving, unload_if_idle),
                name=f"modelcache-idle-{self._name}",
                daemon=True,
            )
            self.thread.start()

    def _watch(
        self,
        idle_unload: float,
        serving: Callable[[], bool],
        unload_if_idle: Callable[[float], bool],
    ) -> None:
        while not self._stopped.wait(min(1.0, idle_unload / 4)) and serving():
            if unload_if_idle(idle_unload):
                log.info("model %s was idle for %.1fs: unloaded", self._name, idle_unload)
                return
