"""Default loaders (chosen by file suffix) and helpers to fill a module without holding weights twice.

Pickles are never trusted: ``torch.load`` always runs with ``weights_only=True``, so a
checkpoint whose pickle would run code fails with :class:`~modelcache.LoadError` and the code
never runs. ``mmap=True`` maps the file instead of reading it, so several worker processes share
one copy of the weights through the page cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "TORCH_SUFFIXES",
    "build_on_meta",
    "default_loader",
    "load_safetensors",
    "load_torch",
    "module_loader",
]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
Loader = Callable[[Path], Any]


class UnsupportedFormat(ValueError):
    """No default loader knows this file; the caller must pass ``loader=``."""


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A ``.safetensors`` file as a state dict (memory-mapped, zero-copy on CPU)."""
    from safetensors.torch import load_file

    return dict(load_file(str(path), device=device))


def load_torch(path: Path, device: str = "cpu") -> Any:
    """``torch.load(path, map_location=device, weights_only=True, mmap=True)``.

    Files in torch's legacy (non-zip) format cannot be mapped; they are read normally,
    still with ``weights_only=True``.
    """
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error) and "zipfile" not in str(error):
            raise
        return torch.load(path, map_location=device, weights_only=True)


def default_loader(path: Path, device: str = "cpu") -> Any:
    """Load ``path`` by its suffix: safetensors, or torch's ``.pt/.pth/.bin/.ckpt``."""
    if path.is_dir():
        raise UnsupportedFormat(
            f"{path.name} is a directory: pass loader= to say how to load it "
            "(the loader receives the directory's Path)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path, device)
    if suffix in TORCH_SUFFIXES:
        return load_torch(path, device)
    raise UnsupportedFormat(
        f"no default loader for {path.name!r} (known: .safetensors, {', '.join(TORCH_SUFFIXES)});"
        " pass loader="
    )


def build_on_meta(
    factory: Callable[[], Any],
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
) -> Any:
    """Build a module on the meta device, then adopt ``state_dict``'s tensors in place.

    ``load_state_dict(assign=True)`` takes the (memory-mapped) tensors as the parameters
    instead of copying them, so the weights are never held twice: peak memory stays near the
    checkpoint's size, and with ``mmap`` loading the pages are shared between processes.
    Buffers the checkpoint does not hold (non-persistent ones) are created on the CPU again.
    """
    import torch

    with torch.device("meta"):
        module = factory()
    module.load_state_dict(state_dict, strict=strict, assign=True)
    leftovers = [name for name, t in _tensors(module) if t.is_meta]
    if leftovers:
        _materialize(module, factory, leftovers)
    return module


def _tensors(module: Any) -> list[tuple[str, Any]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _materialize(module: Any, factory: Callable[[], Any], names: list[str]) -> None:
    """Give buffers left on the meta device their real values from a CPU-built twin."""
    import torch

    buffers = dict(module.named_buffers())
    missing_params = [name for name in names if name not in buffers]
    if missing_params:
        raise ValueError(f"the checkpoint has no values for {', '.join(missing_params[:5])}")
    with torch.device("cpu"):
        twin = factory()
    twin_buffers = dict(twin.named_buffers())
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        persistent = leaf not in getattr(owner, "_non_persistent_buffers_set", set())
        owner.register_buffer(leaf, twin_buffers[name], persistent=persistent)
    del twin


def module_loader(
    factory: Callable[[], Any],
    *,
    device: str = "cpu",
    key: str | None = None,
    strict: bool = True,
) -> Loader:
    """A loader that builds ``factory()`` on the meta device and fills it from the file.

    ``key`` picks a nested state dict (for checkpoints like ``{"model_state_dict": ...}``).

    Example::

        handle = ModelHandle("net", source=url, loader=module_loader(Net))
    """

    def load(path: Path) -> Any:
        state = default_loader(path, device)
        if key is not None:
            state = state[key]
        module = build_on_meta(factory, state, strict=strict)
        return module.eval()

    return load
