"""Names unique to one writer, and timestamps for metadata."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import datetime, timezone

__all__ = ["now_iso", "unique"]


def unique() -> str:
    """``host.pid.random``: a name no other writer (thread, process or host) picks."""
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def now_iso() -> str:
    """The current UTC time, to the second, as ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
