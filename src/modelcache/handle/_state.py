"""The two enums of a handle: where it is in its life (:class:`State`) and when it starts
its work (:class:`Strategy`)."""

from __future__ import annotations

import enum

__all__ = ["State", "Strategy"]


class State(enum.Enum):
    """Where a handle is in its life; ``status()["state"]`` shows the lowercase value."""

    NOT_LOADED = "not_loaded"
    FETCHING = "fetching"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


class Strategy(str, enum.Enum):
    """When a handle starts its work: in ``start()`` (eager, background) or on first ``get()``."""

    EAGER = "eager"
    LAZY = "lazy"
    BACKGROUND = "background"

    @classmethod
    def parse(cls, value: str | Strategy) -> Strategy:
        """A :class:`Strategy` from its name (case-insensitive); ``ValueError`` otherwise."""
        if isinstance(value, Strategy):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown strategy {value!r}; expected one of {names}") from None
