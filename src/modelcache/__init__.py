"""modelcache: get ML model weights onto a machine and into memory for web services.

Fast, safely, and once: verified, resumable, locked downloads into a shared cache, and
``ModelHandle`` objects that load them eagerly, lazily or in the background.

``import modelcache`` is light: torch, cloud clients and web frameworks are imported only when
a model loads, a cloud source is read or an integration module is imported.
"""

from ._transfer import TransferOptions
from ._version import __version__
from .cache import Cache, Entry
from .errors import (
    InsufficientSpaceError,
    IntegrityError,
    LoadError,
    LockTimeoutError,
    ModelCacheError,
    NotCachedError,
    NotReadyError,
    SourceError,
)
from .handle import ModelHandle, State, Strategy
from .registry import Registry

__all__ = [
    "Cache",
    "Entry",
    "InsufficientSpaceError",
    "IntegrityError",
    "LoadError",
    "LockTimeoutError",
    "ModelCacheError",
    "ModelHandle",
    "NotCachedError",
    "NotReadyError",
    "Registry",
    "SourceError",
    "State",
    "Strategy",
    "TransferOptions",
    "__version__",
]
