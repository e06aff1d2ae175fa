"""The transfer engine: one remote file into a local part file, resumable, verified, retrying.

- :mod:`._options`: ``TransferOptions``, how downloads behave;
- :mod:`._reader`: ``Reader`` and ``RangeStream``, what a kind of source implements;
- :mod:`._engine`: ``download()``, the passes over a file (first request, one stream or ranges);
- :mod:`._stream`: one stream, read by a thread and hashed in order;
- :mod:`._ranges`: parallel chunks, hashed in order;
- :mod:`._part`: the part file, writes recorded in the range map, the in-order sha256;
- :mod:`._resume`: the range map beside the part file.

Retries and the two kinds of failure (``TransientError``, ``FatalError``) are
:mod:`modelcache._retry`'s, shared with metadata calls.
"""

from __future__ import annotations

from modelcache._retry import FatalError, TransientError

from ._engine import TransferResult, download
from ._options import TransferOptions
from ._part import Progress
from ._reader import RangeStream, Reader
from ._resume import discard_part, read_resume_state, resume_progress

__all__ = [
    "FatalError",
    "Progress",
    "RangeStream",
    "Reader",
    "TransferOptions",
    "TransferResult",
    "TransientError",
    "discard_part",
    "download",
    "read_resume_state",
    "resume_progress",
]
