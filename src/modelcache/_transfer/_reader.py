"""What a reader (one per kind of source) gives the engine: byte ranges of one remote file."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["RangeStream", "Reader", "close_quietly"]


@dataclass
class RangeStream:
    """An open response for a byte range.

    Attributes:
        pieces: the body, in order.
        start: where the body starts in the file (0 when the origin ignored the range).
        size: the whole file's size, when the origin said.
        etag: the origin's validator for this version of the file, if any.
        ranged: whether the origin honoured the range (so later chunks may be ranged too).
        close: release the response (whether or not the body was read).
        readinto: reads the next bytes of the body into a buffer and returns how many (0 at
            the end), for readers that can skip a copy; the engine then uses it, not ``pieces``.
        silent: whether the origin has sent nothing more yet (no byte waits on the connection),
            for readers that can tell; ``close`` must then end a read that waits.
    """

    pieces: Iterator[bytes]
    start: int
    size: int | None
    etag: str | None
    ranged: bool
    close: Callable[[], None] = field(default=lambda: None)
    readinto: Callable[[memoryview], int] | None = None
    silent: Callable[[], bool] | None = None


class Reader(ABC):
    """Opens byte ranges of one remote file."""

    #: preferred bytes per ranged request, or None to use ``TransferOptions.chunk_size``
    chunk_size: int | None = None
    #: whether a download's first request asks for the whole rest of the file rather than its
    #: first few chunks: one request for a fast origin, but when the origin proves slow per
    #: connection, that request is cut after those chunks and its bytes in flight are sent
    #: for nothing. For stores whose requests cost more than that (S3 bills each GET and
    #: answers it after tens of milliseconds; a capped connection has little in flight).
    first_request_to_end: bool = False

    @abstractmethod
    def open(self, start: int, end: int | None, etag: str | None) -> RangeStream:
        """Open ``[start, end)`` (``end=None``: to the end). ``etag``: the version expected.

        Raises :class:`TransientError` or :class:`FatalError`. When the file changed since
        ``etag`` was recorded, the reader answers with ``start == 0`` (a fresh, whole copy)
        or with the new ``etag``.
        """

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections."""


def close_quietly(stream: RangeStream | None) -> None:
    """Release a response, ignoring errors (closing a read stream cannot lose data)."""
    if stream is not None:
        with contextlib.suppress(Exception):
            stream.close()
