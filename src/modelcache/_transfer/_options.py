"""``TransferOptions``: how downloads behave."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MiB", "TransferOptions"]

MiB = 1 << 20


@dataclass(frozen=True)
class TransferOptions:
    """How downloads behave; every field has a default that suits a web service.

    Attributes:
        connections: concurrent ranged requests per file at most (1 = a single stream); a
            parallel download starts with 8 and doubles them while the total rate rises.
        chunk_size: bytes asked for by each ranged request.
        piece_size: bytes read from the network at a time, at most (a slow HTTP stream reads
            less at a time, so that its progress moves every half second at most).
        split_below: bytes per second; a download's first request (its first 16 MiB) is
            timed over its first 512 KiB: slower than this, the rest is fetched as parallel
            ranged requests while it is read on (as one stream after all when they prove no
            faster), else as one stream.
            ``math.inf``: parallel from the first byte; ``0``: one stream, no first measure.
        retries: attempts after a transient failure, counted since the last byte of progress.
        backoff: first retry delay in seconds, doubled each attempt, with jitter.
        max_backoff: cap on one delay (a longer ``Retry-After`` is honoured up to ``deadline``).
        deadline: give up when no byte arrived for this long while retrying.
        stall_timeout: a connection that delivers no byte for this long is an error (retried).
        connect_timeout: seconds to open a connection.
    """

    connections: int = 16
    chunk_size: int = 2 * MiB
    piece_size: int = 256 * 1024
    split_below: float = 256 * MiB
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 8.0
    deadline: float = 60.0
    stall_timeout: float = 30.0
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.connections < 1 or self.chunk_size < 1 or self.piece_size < 1:
            raise ValueError("connections, chunk_size and piece_size must be >= 1")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if not self.split_below >= 0:
            raise ValueError("split_below must be >= 0 (math.inf: always parallel)")
