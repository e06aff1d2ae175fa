"""Registry: the models a service holds, their readiness, and one place to start and stop them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .handle import ModelHandle, Strategy

__all__ = ["Registry"]

log = logging.getLogger("modelcache")


class Registry(Mapping[str, ModelHandle]):
    """A read-only mapping of names to handles, with readiness for health probes.

    ``models["whisper-tiny"]``, ``"sharp" in models`` and ``list(models)`` (the names) work as
    for a dict.
    """

    def __init__(self, handles: Iterable[ModelHandle] = ()) -> None:
        self._handles: dict[str, ModelHandle] = {}
        self._lock = threading.Lock()
        for handle in handles:
            self.add(handle)

    def add(self, handle: ModelHandle) -> ModelHandle:
        """Add a handle; a name already there raises ``ValueError``. Returns the handle."""
        if not isinstance(handle, ModelHandle):
            raise TypeError(f"expected a ModelHandle, got {type(handle).__name__}")
        with self._lock:
            if handle.name in self._handles:
                raise ValueError(f"a model named {handle.name!r} is already registered")
            self._handles[handle.name] = handle
        return handle

    def __getitem__(self, name: str) -> ModelHandle:
        return self._handles[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._handles))

    def __len__(self) -> int:
        return len(self._handles)

    def __repr__(self) -> str:
        return f"Registry({list(self._handles)!r})"

    def start(self) -> None:
        """``start()`` every handle: background ones first, then eager ones (which block).

        A required eager handle that fails raises; an optional one is logged and skipped.
        """
        handles = list(self._handles.values())
        for handle in handles:
            if handle.strategy is Strategy.BACKGROUND:
                handle.start()
        for handle in handles:
            if handle.strategy is Strategy.EAGER:
                try:
                    handle.start()
                except Exception:
                    if handle.required:
                        raise
                    log.warning("optional model %s failed to start", handle.name, exc_info=True)

    @property
    def ready(self) -> bool:
        """True when every required handle is READY (or unloaded by ``idle_unload``, which loads
        again on the next ``get()``)."""
        return all(h.available for h in self._handles.values() if h.required)

    def status(self) -> dict[str, Any]:
        """``{"ready": bool, "models": {name: handle.status(), ...}}``."""
        return {
            "ready": self.ready,
            "models": {name: handle.status() for name, handle in self._handles.items()},
        }

    def fetch_all(self) -> dict[str, str]:
        """Fetch every handle's files into its cache without loading any model; name -> path."""
        return {name: str(handle.fetch()) for name, handle in self._handles.items()}

    def close(self, timeout: float | None = None) -> None:
        """Stop background work and unload every model.

        Every handle is told to stop first (downloads are cancelled at once, their part files
        kept for a later resume), then each one's threads are waited for (up to ``timeout``
        seconds each, default :attr:`ModelHandle.close_timeout`) and its model unloaded.
        """
        handles = list(self._handles.values())
        for handle in handles:
            handle._stop()
        for handle in handles:
            handle.close(timeout)
