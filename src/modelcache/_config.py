"""Environment variables, read in one place, each time they are needed (never frozen at import).

An empty value counts as unset.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "cache_home",
    "env",
    "offline",
    "progress_enabled",
    "quantize_override",
    "read_only_paths",
    "strategy_override",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env(name: str) -> str | None:
    """The variable's value, or ``None`` when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def _flag(name: str) -> bool | None:
    value = env(name)
    if value is None:
        return None
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected one of 1/0, true/false, yes/no, on/off")


def cache_home() -> Path:
    """``$MODELCACHE_HOME``, else the platform's user cache directory for modelcache."""
    value = env("MODELCACHE_HOME")
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("modelcache", appauthor=False))


def read_only_paths() -> list[Path]:
    """``$MODELCACHE_READ_ONLY_PATHS``, split on ``os.pathsep``."""
    value = env("MODELCACHE_READ_ONLY_PATHS") or ""
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def offline() -> bool:
    """``$MODELCACHE_OFFLINE``: never touch the network."""
    return bool(_flag("MODELCACHE_OFFLINE"))


def strategy_override() -> str | None:
    """``$MODELCACHE_STRATEGY``: ``eager``, ``lazy`` or ``background``, lowercased."""
    value = env("MODELCACHE_STRATEGY")
    return value.lower() if value else None


def quantize_override() -> str | None:
    """``$MODELCACHE_QUANTIZE``: ``"int8"``, ``"none"`` or ``None`` when unset."""
    value = env("MODELCACHE_QUANTIZE")
    return value.lower() if value else None


def progress_enabled(stream_is_tty: bool) -> bool:
    """Whether to draw progress bars: ``$MODELCACHE_PROGRESS`` if set, else only on a terminal."""
    flag = _flag("MODELCACHE_PROGRESS")
    return stream_is_tty if flag is None else flag
