"""Drop-ins for ``torch.hub.load_state_dict_from_url``, ``whisper.load_model`` and
huggingface_hub's ``hf_hub_download`` / ``snapshot_download``.

Same arguments, same return values, one import changed; the file goes through modelcache's
cache (locked against concurrent downloads, resumable, verified, no network on a warm start)
and pickles are loaded with ``weights_only=True`` unless you say otherwise::

    # before
    state_dict = torch.hub.load_state_dict_from_url(URL, progress=True)
    model = whisper.load_model("base")
    from huggingface_hub import hf_hub_download, snapshot_download
    # after
    from modelcache.compat import load_state_dict_from_url, whisper_load_model
    state_dict = load_state_dict_from_url(URL, progress=True)
    model = whisper_load_model("base")
    from modelcache.compat import hf_hub_download, snapshot_download

A file that torch.hub or openai-whisper downloaded before (``<model_dir>/<file name>``,
``~/.cache/whisper/<size>.pt``) is used in place instead of being downloaded again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._hashing import hash_file
from ._hf_compat import LocalEntryNotCachedError, hf_hub_download, snapshot_download
from .cache import Cache, Fetched
from .errors import IntegrityError, ModelCacheError
from .recipes import WHISPER_MODELS, _import_whisper, whisper_loader, whisper_sha256

__all__ = [
    "HASH_REGEX",
    "LocalEntryNotCachedError",
    "hf_hub_download",
    "load_state_dict_from_url",
    "snapshot_download",
    "whisper_load_model",
]

log = logging.getLogger("modelcache")

HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
"""torch.hub's convention: ``name-<first hex digits of the sha256>.ext``."""


def load_state_dict_from_url(
    url: str,
    model_dir: str | os.PathLike[str] | None = None,
    map_location: Any = None,
    progress: bool = True,
    check_hash: bool = False,
    file_name: str | None = None,
    weights_only: bool = True,
) -> dict[str, Any]:
    """``torch.hub.load_state_dict_from_url`` through modelcache's cache.

    Args:
        url: where the checkpoint is (any modelcache source: ``https://``, ``s3://``, ...).
        model_dir: the cache directory to use (default: modelcache's, ``$MODELCACHE_HOME``).
            A file torch.hub saved there (or in torch.hub's checkpoints directory when
            ``model_dir`` is not given) is used in place.
        map_location: as for ``torch.load``.
        progress: ``False`` never draws a progress bar; ``True`` draws one as modelcache
            does (on a terminal, or as ``$MODELCACHE_PROGRESS`` says).
        check_hash: the file name must carry the sha256's first hex digits,
            ``name-<digits>.ext``; a file that does not match raises
            :class:`~modelcache.IntegrityError` and is removed from the cache.
        file_name: the name whose hash prefix ``check_hash`` reads (default: the URL's).
        weights_only: ``True`` by default (torch.hub's default is ``False``): a pickle that
            would run code fails with ``pickle.UnpicklingError`` and runs nothing.

    Returns:
        what ``torch.load`` returns for the file (tensors memory-mapped when possible).
    """
    name = file_name or os.path.basename(urlsplit(str(url)).path)
    cache = Cache(model_dir) if model_dir is not None else Cache()
    sources: list[str] = [str(url)]
    existing = _hub_file(model_dir, name)
    if existing is not None:
        log.info("using %s downloaded earlier by torch.hub", existing)
        sources.insert(0, str(existing))
    fetched = cache.fetch_details(sources, model=name, progress_bar=None if progress else False)
    if check_hash:
        match = HASH_REGEX.search(name)
        if match is not None:
            _check_prefix(cache, fetched, match.group(1), name)
    loaded: dict[str, Any] = _torch_load(fetched.path, map_location, weights_only)
    return loaded


def _hub_file(model_dir: str | os.PathLike[str] | None, name: str) -> Path | None:
    """The plain file torch.hub would have saved for ``name``, if it exists."""
    if model_dir is None:
        import torch.hub

        directory = Path(torch.hub.get_dir()) / "checkpoints"
    else:
        directory = Path(model_dir).expanduser()
    candidate = directory / name
    return candidate if name and candidate.is_file() else None


def _check_prefix(cache: Cache, fetched: Fetched, prefix: str, name: str) -> None:
    digest = fetched.sha256 or hash_file(fetched.path)
    if digest.startswith(prefix):
        return
    if fetched.key is not None:  # an entry of the cache (never a file used in place)
        cache.release(fetched.key)
        # KeyError: a read-only layer's; ModelCacheError: another process still uses it
        with contextlib.suppress(KeyError, ModelCacheError):
            cache.remove(fetched.key)
    raise IntegrityError(
        f"invalid hash value: the file name asks for a sha256 starting {prefix!r}, "
        f"the file has {digest}",
        model=name,
        source=fetched.source,
    )


def _torch_load(path: Path, map_location: Any, weights_only: bool) -> Any:
    """``torch.load``, memory-mapped when the format allows; torch.hub's zipped checkpoints too."""
    import torch

    if _is_legacy_zip(path):  # a zip holding one checkpoint: read it without extracting
        with zipfile.ZipFile(path) as archive:
            data = archive.read(archive.infolist()[0])
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only, mmap=True)
    except RuntimeError as error:  # torch's legacy (pre-1.6) format cannot be mapped
        if "mmap" not in str(error) and "zipfile" not in str(error):
            raise
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def _is_legacy_zip(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
    return len(members) == 1 and not members[0].is_dir()


def whisper_load_model(
    name: str,
    device: Any = None,
    download_root: str | os.PathLike[str] | None = None,
    in_memory: bool = False,
) -> Any:
    """``whisper.load_model`` through modelcache's cache: a ``whisper.Whisper``.

    ``name`` is an official size (``tiny`` ... ``turbo``, verified against its sha256) or the
    path of a checkpoint. ``download_root`` is the cache directory (default: modelcache's); a
    file openai-whisper downloaded before (``<download_root or ~/.cache/whisper>/<size>.pt``)
    is verified and used in place. The model is built without holding the weights twice
    (:func:`modelcache.recipes.build_whisper`). Needs openai-whisper installed.
    """
    if _import_whisper() is None:
        raise ImportError(
            "whisper_load_model needs openai-whisper: pip install 'modelcache[whisper]' "
            "(or, without triton: pip install --no-deps openai-whisper && "
            "pip install tiktoken numba more-itertools)"
        )
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name in WHISPER_MODELS:
        url = WHISPER_MODELS[name]
        cache = Cache(download_root) if download_root is not None else Cache()
        sources = [url]
        existing = _whisper_file(download_root, url)
        if existing is not None:
            sources.insert(0, str(existing))
        path = cache.fetch(sources, whisper_sha256(name), model=f"whisper-{name}")
        size: str | None = name
    elif os.path.isfile(name):
        path, size = Path(name), None
    else:
        raise RuntimeError(f"Model {name} not found; available models = {list(WHISPER_MODELS)}")
    return whisper_loader(size, device=str(device), in_memory=in_memory)(path)


def _whisper_file(download_root: str | os.PathLike[str] | None, url: str) -> Path | None:
    """The file ``whisper.load_model`` would have downloaded for ``url``, if it exists."""
    if download_root is None:
        default = os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(os.getenv("XDG_CACHE_HOME", default)) / "whisper"
    else:
        root = Path(download_root).expanduser()
    candidate = root / os.path.basename(url)
    return candidate if candidate.is_file() else None
