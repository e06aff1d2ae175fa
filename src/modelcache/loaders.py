"""Default loaders (chosen by file suffix), and helpers that fill a module without a second copy.

Pickles are never trusted: ``torch.load`` always runs with ``weights_only=True``, so a
checkpoint whose pickle would run code fails (the handle raises :class:`~modelcache.LoadError`)
and the code never runs. ``mmap=True`` maps the file instead of reading it, so several worker
processes share one copy of the weights through the page cache.

"Build the module, then fill it" without a second copy of the weights::

    handle = ModelHandle("net", source=url, loader=module_loader(Net))

builds ``Net()`` on the ``meta`` device (no memory, no random initialisation) and adopts the
checkpoint's memory-mapped tensors as its parameters with ``load_state_dict(assign=True)``.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TORCH_SUFFIXES",
    "UnsafeCheckpointError",
    "UnsupportedFormat",
    "build_on_meta",
    "default_loader",
    "load_directory",
    "load_safetensors",
    "load_torch",
    "module_loader",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
Loader = Callable[[Path], Any]


class UnsupportedFormat(ValueError):
    """No default loader knows this file; the caller must pass ``loader=``."""


class UnsafeCheckpointError(ValueError):
    """The checkpoint's pickle would import or call code, which is never allowed."""


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A ``.safetensors`` file as a state dict (memory-mapped, zero-copy on CPU)."""
    from safetensors.torch import load_file

    return dict(load_file(str(path), device=device))


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


def load_directory(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Every ``*.safetensors`` file directly in ``path`` (shards), merged into one state dict."""
    shards = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if not shards:
        raise UnsupportedFormat(
            f"{path.name} is a directory without .safetensors files: pass loader= to say how "
            "to load it (the loader receives the directory's Path)"
        )
    state: dict[str, Any] = {}
    for shard in shards:
        state.update(load_safetensors(shard, device))
    return state


def default_loader(path: Path, device: str = "cpu") -> Any:
    """Load ``path`` by its suffix: safetensors, or torch's ``.pt/.pth/.bin/.ckpt``.

    A directory's ``*.safetensors`` files are merged into one state dict.
    """
    if path.is_dir():
        return load_directory(path, device)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path, device)
    if suffix in TORCH_SUFFIXES:
        return load_torch(path, device)
    raise UnsupportedFormat(
        f"no default loader for {path.name!r} (known: .safetensors, {', '.join(TORCH_SUFFIXES)});"
        " pass loader="
    )


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

    return load
