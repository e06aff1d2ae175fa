"""Default loaders (chosen by file suffix), and helpers that fill a module without a second copy.

Pickles are never trusted: ``torch.load`` always runs with ``weights_only=True``, so a
checkpoint whose pickle would run code fails (the handle raises :class:`~modelcache.LoadError`)
and the code never runs. ``mmap=True`` maps the file instead of reading it, so several worker
processes share one copy of the weights through the page cache.

"Build the module, then fill it" without a second copy of the weights::

    handle = ModelHandle("net", source=url, loader=module_loader(Net))

builds ``Net()`` on the ``meta`` device (no memory, no random initialisation) and adopts the
checkpoint's memory-mapped tensors as its parameters with ``load_state_dict(assign=True)``.

The Hugging Face libraries load a cached repo (a directory source such as
``hf://org/repo``) with :func:`from_pretrained` (transformers ``Auto*`` and model classes,
diffusers pipelines) and :func:`sentence_transformer`; each imports its library only when it
loads, so a module that defines handles stays light::

    handle = ModelHandle("minilm", source="hf://sentence-transformers/all-MiniLM-L6-v2",
                         loader=from_pretrained("transformers.AutoModel"), quantize="int8")

``.onnx`` files load as an ``onnxruntime.InferenceSession`` on CPU (external data, such as a
``model.onnx_data`` file beside the model, is read from the same directory).
"""

from __future__ import annotations

import importlib
import json
import pickle
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ONNX_SUFFIX",
    "TORCH_SUFFIXES",
    "UnsafeCheckpointError",
    "UnsupportedFormat",
    "build_on_meta",
    "default_loader",
    "from_pretrained",
    "load_directory",
    "load_onnx",
    "load_safetensors",
    "load_torch",
    "module_loader",
    "preparation",
    "sentence_transformer",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
ONNX_SUFFIX = ".onnx"
INDEX_SUFFIX = ".safetensors.index.json"
Loader = Callable[[Path], Any]


_PREPARE = "_modelcache_prepare"  # the attribute a loader of this module carries


class UnsupportedFormat(ValueError):
    """No default loader knows this file; the caller must pass ``loader=``."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle would import or call code, which is never allowed."""


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A ``.safetensors`` file as a state dict (memory-mapped, zero-copy on CPU).

    On CPU the file is mapped once (copy-on-write) and its pages are mapped in one call, the
    kernel reading ahead in long runs (:mod:`modelcache._safetensors_map`,
    :mod:`modelcache._prefault`); nothing is copied. Other devices, and files that reader does
    not know, go through ``safetensors.torch.load_file``.
    """
    from modelcache._prefault import populate
    from modelcache._safetensors_map import map_safetensors

    state = map_safetensors(path) if device == "cpu" else None
    if state is None:
        from safetensors.torch import load_file

        state = dict(load_file(str(path), device=device))
    populate(state.values())
    return state


def load_torch(path: Path, device: str = "cpu") -> Any:
    """``torch.load(path, map_location=device, weights_only=True, mmap=True)``.

    Files in torch's legacy (non-zip) format cannot be mapped; they are read normally, still
    with ``weights_only=True``. A pickle that refers to code raises
    :class:`UnsafeCheckpointError` before any of it runs.
    """
    import torch

    try:
        try:
            return torch.load(path, map_location=device, weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap can only be used with files saved with" not in str(error):
                raise
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(_unsafe_reason(path, error)) from None


def _unsafe_reason(path: Path, error: Exception) -> str:
    detail = next(
        (line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "global" in line),
        str(error).splitlines()[0] if str(error) else type(error).__name__,
    )
    return (
        f"{path.name} is not a plain weights file: its pickle needs code to load ({detail}). "
        "modelcache loads torch files with weights_only=True and never runs pickled code: "
        "convert the checkpoint to safetensors, or allow its types with "
        "torch.serialization.add_safe_globals if you trust them"
    )


def load_onnx(path: Path) -> Any:
    """An ``onnxruntime.InferenceSession`` of the ``.onnx`` file, on CPU.

    External data (``model.onnx_data`` or whatever the model names) is read from the file's
    directory. Needs onnxruntime (``pip install 'modelcache[onnx]'``).
    """
    try:
        import onnxruntime
    except ImportError:
        raise UnsupportedFormat(
            f"{path.name} is an ONNX model: loading it needs onnxruntime "
            "(pip install 'modelcache[onnx]'), or pass loader="
        ) from None
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _shards(path: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a directory: those its index names, else all of them."""
    indexes = sorted(p for p in path.glob(f"*{INDEX_SUFFIX}") if p.is_file())
    if not indexes:
        return sorted(p for p in path.glob("*.safetensors") if p.is_file()), None
    preferred = [p for p in indexes if p.name == f"model{INDEX_SUFFIX}"]
    if len(indexes) > 1 and not preferred:
        names = ", ".join(p.name for p in indexes)
        raise UnsupportedFormat(
            f"{path.name} has several safetensors indexes ({names}): pass loader= to choose"
        )
    index = (preferred or indexes)[0]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as error:
        raise UnsupportedFormat(f"{index.name} is not a safetensors index: {error}") from None
    return [path / name for name in sorted(set(weight_map.values()))], index


def load_directory(path: Path, device: str = "cpu") -> Any:
    """A directory's weights: its safetensors shards merged into one mapped state dict.

    With an index (``model.safetensors.index.json``), the shards it names are loaded and every
    tensor it lists must be there; without one, every ``*.safetensors`` file directly in
    ``path``. A directory without safetensors but with one ``.onnx`` model loads that model
    (:func:`load_onnx`). The tensors stay memory-mapped: merging copies no data.
    """
    shards, index = _shards(path)
    if not shards:
        models = sorted(p for p in path.glob(f"*{ONNX_SUFFIX}") if p.is_file())
        if len(models) == 1:
            return load_onnx(models[0])
        raise UnsupportedFormat(
            f"{path.name} is a directory without .safetensors files"
            f"{' and with several .onnx models' if models else ''}: pass loader= to say how "
            "to load it (the loader receives the directory's Path)"
        )
    state: dict[str, Any] = {}
    for shard in shards:
        if not shard.is_file():
            raise UnsupportedFormat(f"{path.name}: the index names {shard.name}, which is missing")
        state.update(load_safetensors(shard, device))
    if index is not None:
        listed = json.loads(index.read_text())["weight_map"]
        missing = sorted(set(listed) - set(state))
        if missing:
            raise UnsupportedFormat(
                f"{path.name}: {len(missing)} tensor(s) of {index.name} are in no shard "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
            )
    return state


def default_loader(path: Path, device: str = "cpu") -> Any:
    """Load ``path`` by its suffix: safetensors, ONNX, or torch's ``.pt/.pth/.bin/.ckpt``.

    A directory's safetensors shards are merged into one state dict (:func:`load_directory`).
    """
    if path.is_dir():
        return load_directory(path, device)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path, device)
    if suffix == ONNX_SUFFIX:
        return load_onnx(path)
    if suffix in TORCH_SUFFIXES:
        return load_torch(path, device)
    raise UnsupportedFormat(
        f"no default loader for {path.name!r} (known: .safetensors, .onnx, "
        f"{', '.join(TORCH_SUFFIXES)}); pass loader="
    )


def preparation(loader: Loader | None, source: str) -> Callable[[], object] | None:
    """What ``loader`` imports before it can load, as a call to make early; ``None``: unknown.

    A handle makes this call on a thread of its own while a cold ``get()`` downloads (when the
    download has 3 s or more to go), so the import (torch's takes 1-2 s) overlaps the download
    instead of following it. ``loader=None`` is the default loader of ``source``, known by its
    suffix (torch for safetensors and torch checkpoints, onnxruntime for ``.onnx``); the
    loaders of this module carry their own (the Hugging Face library a loader names, torch for
    :func:`module_loader`). A loader of yours imports what your module already imported:
    nothing to do early.
    """
    if loader is not None:
        prepare: Callable[[], object] | None = getattr(loader, _PREPARE, None)
        return prepare
    suffix = PurePosixPath(urlsplit(source).path).suffix.lower()
    if suffix == ".safetensors" or suffix in TORCH_SUFFIXES:
        return _import_torch
    if suffix == ONNX_SUFFIX:
        return lambda: importlib.import_module("onnxruntime")
    return None  # a directory: its files decide, and they are not known yet


def _import_torch() -> object:
    return importlib.import_module("torch")


def _prepared(load: Loader, prepare: Callable[[], object]) -> Loader:
    """``load``, carrying the call that imports what it needs (see :func:`preparation`)."""
    setattr(load, _PREPARE, prepare)
    return load


# -- the Hugging Face libraries ----------------------------------------------------------------


def _resolve(target: Any) -> Any:
    """``target`` itself, or the object a ``"package.module.Name"`` string names."""
    if not isinstance(target, str):
        return target
    module_name, _, attribute = target.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"expected 'package.module.Name', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        package = module_name.split(".")[0]
        extra = _EXTRAS.get(package, package)
        raise ImportError(f"{target} needs {package}: pip install '{extra}' ({error})") from None
    return getattr(module, attribute)


_EXTRAS = {
    "transformers": "modelcache[transformers]",
    "sentence_transformers": "modelcache[sentence-transformers]",
    "diffusers": "modelcache[diffusers]",
}


def _directory(path: Path, what: str) -> str:
    if not path.is_dir():
        raise UnsupportedFormat(
            f"{what} loads a directory (a repo or folder source such as hf://owner/repo), "
            f"but the source is the file {path.name!r}"
        )
    return str(path)


def from_pretrained(cls: Any, **kwargs: Any) -> Loader:
    """A loader calling ``cls.from_pretrained(directory, **kwargs)`` on the cached directory.

    ``cls`` is a transformers ``Auto*`` or model class, a diffusers pipeline, or any class
    with ``from_pretrained``; or its dotted name (``"transformers.AutoModel"``), imported only
    when the model loads. ``local_files_only=True`` is passed unless you pass it: the cached
    directory is complete, and the library is never asked to reach the Hub. safetensors
    weights are memory-mapped by the libraries (transformers maps them; diffusers with
    accelerate installed), and the result is a ``torch.nn.Module`` that ``quantize="int8"``
    applies to::

        handle = ModelHandle("bert", source="hf://google-bert/bert-base-uncased",
                             loader=from_pretrained(AutoModel, torch_dtype="auto"))
    """
    options = {"local_files_only": True, **kwargs}

    def load(path: Path) -> Any:
        return _resolve(cls).from_pretrained(_directory(path, "from_pretrained"), **options)

    return _prepared(load, lambda: _resolve(cls)) if isinstance(cls, str) else load


def sentence_transformer(**kwargs: Any) -> Loader:
    """A loader making a ``sentence_transformers.SentenceTransformer`` of the cached directory.

    ``kwargs`` go to ``SentenceTransformer`` (``device=``, ``truncate_dim=``, ...);
    ``local_files_only=True`` is passed unless you pass it. sentence-transformers is imported
    when the model loads (``pip install 'modelcache[sentence-transformers]'``)::

        handle = ModelHandle("minilm", source="hf://sentence-transformers/all-MiniLM-L6-v2",
                             loader=sentence_transformer(device="cpu"))
    """
    options = {"local_files_only": True, **kwargs}

    def load(path: Path) -> Any:
        model_class = _resolve(_SENTENCE_TRANSFORMER)
        return model_class(_directory(path, "sentence_transformer"), **options)

    return _prepared(load, lambda: _resolve(_SENTENCE_TRANSFORMER))


_SENTENCE_TRANSFORMER = "sentence_transformers.SentenceTransformer"


# -- building on the meta device --------------------------------------------------------------


def build_on_meta(
    factory: Callable[[], Any],
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    device: str | None = None,
) -> Any:
    """Build ``factory()`` on the meta device, then adopt ``state_dict``'s tensors in place.

    ``load_state_dict(assign=True)`` takes the (memory-mapped) tensors as the parameters
    instead of copying them, so the weights are never held twice: peak memory stays near the
    checkpoint's size, and with ``mmap`` loading the pages are shared between processes.

    Buffers the checkpoint does not hold (non-persistent ones, computed in ``__init__``) get
    their real values from a second build in which only the *parameters* live on the meta
    device; so no parameter is ever materialised twice. They are put on ``device`` (default:
    the device of the checkpoint's tensors). A parameter missing from the checkpoint raises
    ``ValueError``.
    """
    import torch

    with torch.device("meta"):
        module = factory()
    module.load_state_dict(state_dict, strict=strict, assign=True)
    leftovers = [name for name, tensor in _tensors(module) if tensor.is_meta]
    if leftovers:
        _materialize(module, factory, leftovers, device or _device_of(state_dict))
    return module


def _tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _device_of(state_dict: Mapping[str, Any]) -> str:
    for value in state_dict.values():
        device = getattr(value, "device", None)
        if device is not None and device.type != "meta":
            return str(device)
    return "cpu"


def _materialize(module: Any, factory: Callable[[], Any], names: list[str], device: str) -> None:
    """Give buffers left on the meta device their real values from a parameter-less twin."""
    buffers = dict(module.named_buffers())
    missing = [name for name in names if name not in buffers]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint has no values for {len(missing)} parameter(s): {shown}")
    with _parameters_on_meta():
        twin = factory()
    twin_buffers = dict(twin.named_buffers())
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(leaf, twin_buffers[name].to(device), persistent=persistent)
    del twin, twin_buffers


_META_PARAMS = threading.local()
_HOOK_LOCK = threading.Lock()
_HOOK_INSTALLED = False


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """In this thread, every parameter registered on a module moves to the meta device.

    Buffers keep their real values. ``torch.empty`` of a parameter touches no page, so the
    parameters cost neither memory nor initialisation time. Other threads are unaffected.
    """
    global _HOOK_INSTALLED
    import torch
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def to_meta(module: Any, name: str, param: Any) -> Any:
        if getattr(_META_PARAMS, "active", False) and not param.is_meta:
            return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    with _HOOK_LOCK:
        if not _HOOK_INSTALLED:  # installed once: removing it could race other threads
            register_module_parameter_registration_hook(to_meta)
            _HOOK_INSTALLED = True
    _META_PARAMS.active = True
    try:
        yield
    finally:
        _META_PARAMS.active = False


def module_loader(
    factory: Callable[[], Any],
    *,
    device: str = "cpu",
    key: str | None = None,
    filename: str | None = None,
    strict: bool = True,
) -> Loader:
    """A loader that builds ``factory()`` on the meta device and fills it from the file.

    Args:
        factory: builds the module (called with no arguments, e.g. the class itself).
        device: where the tensors are loaded (``map_location``).
        key: picks a nested state dict (checkpoints like ``{"model_state_dict": ...}``).
        filename: for a directory source, the file inside it to load (default: the
            directory's ``*.safetensors`` shards).
        strict: passed to ``load_state_dict``.

    The module is returned in ``eval()`` mode. Example::

        handle = ModelHandle("net", source=url, loader=module_loader(Net))
    """

    def load(path: Path) -> Any:
        target = path / filename if filename is not None and path.is_dir() else path
        state = default_loader(target, device)
        if key is not None:
            state = state[key]
        module = build_on_meta(factory, state, strict=strict, device=device)
        del state
        return module.eval()

    return _prepared(load, _import_torch)
