"""Drop-ins for huggingface_hub's ``hf_hub_download`` and ``snapshot_download``.

Each call is one ``hf://`` source fetched through the cache (see :mod:`modelcache.compat`):
the Hub is asked once, when the entry is made; a warm start makes no request at all.
huggingface_hub is imported only when the Hub must be asked (or an offline miss is raised).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from ._planners.hub import hub_offline, hub_progress_disabled
from .cache import Cache, Fetched
from .cache._names import unique
from .errors import NotCachedError

__all__ = ["LocalEntryNotCachedError", "hf_hub_download", "hub_url", "snapshot_download"]

log = logging.getLogger("modelcache")

PathLike = str | os.PathLike[str]
Patterns = Sequence[str] | str | None

_REPO_TYPES = {None: "", "model": "", "dataset": "datasets/", "space": "spaces/"}


class LocalEntryNotCachedError(NotCachedError, FileNotFoundError):
    """Offline (``local_files_only=True``, ``HF_HUB_OFFLINE`` or ``MODELCACHE_OFFLINE``) and the
    file or snapshot is not in the cache.

    A :class:`~modelcache.NotCachedError` and a ``FileNotFoundError``; when huggingface_hub is
    installed, the error raised is also its ``LocalEntryNotFoundError``, so existing ``except``
    clauses written for huggingface_hub catch it unchanged.
    """


_HUB_ERROR: type[LocalEntryNotCachedError] | None = None


def _hub_error_type() -> type[LocalEntryNotCachedError]:
    """:class:`LocalEntryNotCachedError`, also huggingface_hub's ``LocalEntryNotFoundError``
    when that can be imported (made once, on the first offline miss)."""
    global _HUB_ERROR
    if _HUB_ERROR is None:
        try:
            from huggingface_hub.errors import LocalEntryNotFoundError
        except ImportError:
            _HUB_ERROR = LocalEntryNotCachedError
        else:
            _HUB_ERROR = type(
                "HubLocalEntryNotCachedError",
                (LocalEntryNotCachedError, LocalEntryNotFoundError),
                {"__module__": __name__, "__doc__": LocalEntryNotCachedError.__doc__},
            )
    return _HUB_ERROR


def __getattr__(name: str) -> Any:
    # pickle finds the class made at run time by its name (errors cross process boundaries)
    if name == "HubLocalEntryNotCachedError":
        return _hub_error_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def hub_url(
    repo_id: str,
    path: str = "",
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    allow_patterns: Patterns = None,
    ignore_patterns: Patterns = None,
) -> str:
    """The ``hf://`` source naming a repo's file (``path``) or the repo (``path=""``)."""
    if repo_type not in _REPO_TYPES:
        raise ValueError(f"invalid repo_type {repo_type!r}: expected 'model', 'dataset' or 'space'")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    url = f"hf://{_REPO_TYPES[repo_type]}{repo_id}"
    if revision:
        url += "@" + quote(revision, safe="")
    if path:
        url += "/" + path.strip("/")
    query = [("include", p) for p in _patterns(allow_patterns)]
    query += [("exclude", p) for p in _patterns(ignore_patterns)]
    return url + ("?" + urlencode(query) if query else "")


def _patterns(value: Patterns) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _fetch(
    url: str,
    repo_id: str,
    *,
    cache_dir: PathLike | None,
    token: str | bool | None,
    endpoint: str | None,
    local_files_only: bool,
    force_download: bool,
) -> Fetched:
    """``url`` through the cache, as huggingface_hub's options say."""
    why = "local_files_only=True" if local_files_only else None
    if why is None and hub_offline():
        why = "HF_HUB_OFFLINE is set"
    cache = Cache(cache_dir, offline=True if why else None)
    if why is None and cache.offline:
        why = "MODELCACHE_OFFLINE is set"
    options = {k: v for k, v in (("token", token), ("endpoint", endpoint)) if v is not None}
    try:
        return cache.fetch_details(
            url,
            storage_options={"hf": options},
            model=repo_id,
            refresh=force_download,
            progress_bar=False if hub_progress_disabled() else None,
        )
    except NotCachedError as error:
        reason = f"not in the cache at {cache.path} and {why or 'offline mode is on'}"
        raise _hub_error_type()(reason, model=error.model, source=error.source) from None


def _place(cached: Path, target: Path) -> Path:
    """Put ``cached`` at ``target`` as a hard link (a copy across filesystems), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if os.path.samefile(cached, target):
            return target
    except OSError:
        pass
    staged = target.with_name(f".{target.name}.{unique()}.modelcache")
    try:
        try:
            os.link(cached, staged)
        except OSError:
            shutil.copyfile(cached, staged)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return target


def hf_hub_download(
    repo_id: str,
    filename: str,
    *,
    subfolder: str | None = None,
    repo_type: str | None = None,
    revision: str | None = None,
    library_name: str | None = None,
    library_version: str | None = None,
    cache_dir: PathLike | None = None,
    local_dir: PathLike | None = None,
    user_agent: dict[str, Any] | str | None = None,
    force_download: bool = False,
    etag_timeout: float = 10,
    token: str | bool | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> str:
    """``huggingface_hub.hf_hub_download`` through modelcache's cache: the file's local path.

    Args:
        repo_id: ``owner/name``.
        filename: the file's path in the repo (below ``subfolder`` when given).
        subfolder: a folder of the repo holding ``filename``.
        repo_type: ``"model"`` (default), ``"dataset"`` or ``"space"``.
        revision: a branch, tag or commit; default ``main``. A branch or tag is resolved once,
            when the file is first fetched, and the commit recorded; ``force_download=True``
            moves to its current head.
        cache_dir: the :class:`~modelcache.Cache` directory (default: ``$MODELCACHE_HOME``,
            else the user cache directory); not huggingface_hub's cache layout.
        local_dir: also put the file at ``local_dir/<subfolder>/<filename>`` (a hard link to
            the cached copy, or a copy on another filesystem) and return that path.
        force_download: fetch again even when cached (the entry is replaced once verified).
        token: a Hub token, ``False`` for none; default ``HF_TOKEN`` or the saved login.
        local_files_only: never touch the network; a miss raises
            :class:`LocalEntryNotCachedError` (also huggingface_hub's ``LocalEntryNotFoundError``
            and a ``FileNotFoundError``). ``HF_HUB_OFFLINE=1`` and ``MODELCACHE_OFFLINE=1`` too.
        endpoint: the Hub or mirror to ask; default ``HF_ENDPOINT``, else huggingface.co.
        library_name: accepted for compatibility, ignored (as are ``library_version``,
            ``user_agent`` and ``etag_timeout``: a warm start sends no request to time out).

    Returns:
        the local path of the file, as a ``str``; the file keeps its name.
    """
    del library_name, library_version, user_agent, etag_timeout
    path = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
    url = hub_url(repo_id, path, repo_type=repo_type, revision=revision)
    fetched = _fetch(
        url,
        repo_id,
        cache_dir=cache_dir,
        token=token,
        endpoint=endpoint,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    if local_dir is None:
        return str(fetched.path)
    return str(_place(fetched.path, Path(local_dir).expanduser().resolve() / path))


def snapshot_download(
    repo_id: str,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: PathLike | None = None,
    local_dir: PathLike | None = None,
    library_name: str | None = None,
    library_version: str | None = None,
    user_agent: dict[str, Any] | str | None = None,
    etag_timeout: float = 10,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
    allow_patterns: Patterns = None,
    ignore_patterns: Patterns = None,
    max_workers: int = 8,
    tqdm_class: Any = None,
    endpoint: str | None = None,
) -> str:
    """``huggingface_hub.snapshot_download`` through modelcache's cache: the folder's local path.

    The repo (the files ``allow_patterns`` / ``ignore_patterns`` choose, with huggingface_hub's
    rules) is one cache entry, published once every file is there and verified. The arguments
    mean what they mean for :func:`hf_hub_download`; ``local_dir`` gets the repo's files (hard
    links to the cached copies) and is returned. ``max_workers`` and ``tqdm_class`` are
    accepted and ignored (modelcache fetches a few files at a time, each with ranged requests,
    and draws its own progress bar).

    Returns:
        the local path of a folder laid out like the repo, as a ``str``.
    """
    del library_name, library_version, user_agent, etag_timeout, max_workers, tqdm_class
    url = hub_url(
        repo_id,
        repo_type=repo_type,
        revision=revision,
        allow_patterns=allow_patterns,
        ignore_patterns=ignore_patterns,
    )
    fetched = _fetch(
        url,
        repo_id,
        cache_dir=cache_dir,
        token=token,
        endpoint=endpoint,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    if local_dir is None:
        return str(fetched.path)
    target = Path(local_dir).expanduser().resolve()
    for file in sorted(p for p in fetched.path.rglob("*") if p.is_file()):
        _place(file, target / file.relative_to(fetched.path))
    return str(target)
