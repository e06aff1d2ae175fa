"""fsspec filesystems for the non-HTTP protocols, imported only when a source needs one."""

from __future__ import annotations

import importlib.util
from typing import Any

from .sources import Source
from .transfer import FatalError

__all__ = ["EXTRAS", "open_filesystem", "require_extra"]

#: protocol -> (module that implements it, the modelcache extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", "hf"),
}


def require_extra(protocol: str) -> None:
    """Raise a clear error naming the exact install command when a backend is missing."""
    module, extra = EXTRAS.get(protocol, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise FatalError(
            f"reading {protocol}:// sources needs {module}: pip install 'modelcache[{extra}]'"
        )


def open_filesystem(source: Source) -> tuple[Any, str]:
    """The fsspec filesystem and path for ``source`` (credentials from ``storage_options``)."""
    require_extra(source.protocol)
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(source.url, **dict(source.storage_options))
    except ValueError as error:
        if "Protocol not known" in str(error):
            raise FatalError(f"unknown scheme {source.protocol!r}") from None
        raise FatalError(f"bad URL: {source.scrub(str(error))}") from None
    except ImportError as error:
        raise FatalError(f"cannot read {source.protocol}:// sources: {error}") from None
    return fs, path
