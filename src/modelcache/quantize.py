"""int8 quantization of a loaded module, cached so that the next start maps int8 weights directly.

The weight of every ``torch.nn.Linear`` (subclasses included, such as Whisper's
``whisper.model.Linear``) is quantized by torchao's ``Int8WeightOnlyConfig`` (symmetric, one
scale per output row) and held as an :class:`~modelcache.int8.Int8Weight`: int8 values and
their scales, multiplied out in the matmul exactly as torchao does. On the real
all-MiniLM-L6-v2 the embeddings stay at cosine 0.9995 to float's (the deprecated ``torch.ao``
dynamic path reaches 0.94 on x86).

The result is written once into the cache as a *derived entry* (plain tensors in a
``torch.save`` file, loaded with ``weights_only=True``), keyed by the source's sha256, the
method, the torch and torchao versions and the module's structure. A later start replaces the
loader's tensors with the cached ones (``torch.load(mmap=True)``, then
``load_state_dict(assign=True)``) without importing torchao: with a lazy loader (the default
loaders map files; see :func:`modelcache.loaders.module_loader`) the float weights are never
read at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .cache import Cache
from .errors import LoadError, LockTimeoutError

__all__ = [
    "INSTALL_HINT",
    "METHODS",
    "TORCHAO_RANGE",
    "derived_key",
    "quantize_model",
    "weight_bytes",
]

log = logging.getLogger("modelcache")

METHODS = ("int8",)
INSTALL_HINT = "pip install 'modelcache[int8]'"
TORCHAO_RANGE = ">=0.18,<0.19"
"""The torchao releases this module is written and tested against (the ``int8`` extra)."""

_CONFIG_VERSION = 2
_FORMAT = 3  # 3: no float weights saved along with the biases
_SCHEME = f"torchao.Int8WeightOnlyConfig(version={_CONFIG_VERSION})"
_PAYLOAD = "modelcache-int8"


class _NotCached(Exception):
    """The quantized weights could not be written to the cache (the model itself is fine)."""


def quantize_model(
    model: Any,
    method: str,
    *,
    name: str,
    source: str,
    cache: Cache,
    source_sha256: str | None,
    path: Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Quantize ``model`` in place with ``method``; the model and a JSON-serialisable report.

    Cached int8 weights for the same source, method, versions and structure are mapped
    instead of quantizing again. ``path`` (the fetched file) identifies local sources given
    without a sha256. Raises :class:`LoadError` (naming ``name`` and ``source``) when the
    model is not a ``torch.nn.Module`` or torchao is missing.
    """
    if method not in METHODS:
        raise LoadError(
            f"unknown quantize method {method!r}; expected one of {METHODS}",
            model=name,
            source=source,
        )
    torch = _import_torch(name, source)
    if not isinstance(model, torch.nn.Module):
        hint = (
            " (a state dict? pass loader=module_loader(YourModel))"
            if isinstance(model, dict)
            else ""
        )
        raise LoadError(
            f"quantize={method!r} needs the loader to return a torch.nn.Module, "
            f"it returned {type(model).__name__}{hint}",
            model=name,
            source=source,
        )
    layers, skipped = _linear_layers(model)
    torchao_version = _torchao_version()
    info: dict[str, Any] = {
        "method": method,
        "scheme": _SCHEME,
        "torchao": torchao_version,
        "layers": len(layers),
        "skipped": skipped,
        "bytes_before": weight_bytes(model),
        "bytes_after": None,
        "quantize_s": None,
        "cached_load_s": None,
        "cache_hit": False,
        "cache_key": None,
    }
    if not layers:
        log.warning("model %s: quantize=%r found no nn.Linear layer to quantize", name, method)
    identity = _source_identity(source_sha256, path)
    if identity is None or torchao_version is None:
        if identity is None:
            log.info("model %s: int8 weights not cached (a directory given without sha256)", name)
        _quantize_now(layers, info, name, source)
    else:
        key = derived_key(identity, method, _structure(model, layers), torchao_version)
        _quantize_cached(model, layers, info, cache, key, name, source, path)
    info["bytes_after"] = weight_bytes(model)
    _populate(model)
    return model, info


# -- quantizing ---------------------------------------------------------------------------------


def _quantize_now(layers: dict[str, Any], info: dict[str, Any], name: str, source: str) -> None:
    """Quantize every layer with torchao, one at a time; their weights become ``Int8Weight``."""
    import torch

    _import_torchao(name, source)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    started = time.monotonic()
    config = Int8WeightOnlyConfig(version=_CONFIG_VERSION, set_inductor_config=False)
    with torch.no_grad():
        for layer in layers.values():
            quantize_(layer, config, filter_fn=lambda module, _fqn, layer=layer: module is layer)
            _adopt_torchao_weight(layer)
            _trim()  # hand this layer's scratch memory back: the peak stays near one layer's
    info["quantize_s"] = round(time.monotonic() - started, 4)


def _adopt_torchao_weight(layer: Any) -> None:
    """Replace torchao's int8 tensor on ``layer`` by an ``Int8Weight`` over the same data."""
    import torch

    from .int8 import Int8Weight

    weight = layer.weight
    zero_point = getattr(weight, "zero_point", None)
    if (
        list(getattr(weight, "block_size", [])) != [1, weight.shape[-1]]
        or getattr(weight, "act_quant_kwargs", None) is not None
        or getattr(weight, "act_pre_scale", None) is not None
        or (zero_point is not None and bool(zero_point.any()))
    ):
        raise RuntimeError(f"torchao returned an unexpected int8 layout: {weight!r}")
    layer.weight = torch.nn.Parameter(
        Int8Weight(weight.qdata, weight.scale, weight.dtype), requires_grad=False
    )
    layer.__dict__.pop("extra_repr", None)  # torchao's repr patch names its own tensor


def _trim() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _linear_layers(model: Any) -> tuple[dict[str, Any], list[str]]:
    """Every ``nn.Linear`` (subclasses too) whose weight can be quantized, and those skipped.

    ``MultiheadAttention.out_proj`` is skipped: its weight is fed to a fused function that int8
    weights do not support, so it stays float.
    """
    import torch
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
    from torch.nn.utils import parametrize

    layers: dict[str, Any] = {}
    skipped: list[str] = []
    for fqn, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = getattr(module, "weight", None)
        if (
            isinstance(module, NonDynamicallyQuantizableLinear)
            or parametrize.is_parametrized(module)
            or not isinstance(weight, torch.Tensor)
            or not weight.is_floating_point()
            or weight.dim() != 2
            or _is_wrapper(weight)
        ):
            skipped.append(fqn)
            continue
        layers[fqn] = module
    return layers, skipped


def _is_wrapper(tensor: Any) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return bool(is_traceable_wrapper_subclass(tensor))


def weight_bytes(model: Any) -> int:
    """Bytes held by the module's parameters and buffers (int8 weights: data plus scales)."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _leaf_tensors([*model.parameters(), *model.buffers()]):
        size = tensor.numel() * tensor.element_size()
        # meta and sparse tensors (Whisper's alignment_heads buffer) have no data pointer
        real = tensor.device.type != "meta" and tensor.layout == torch.strided
        pointer = tensor.data_ptr() if real else 0
        if pointer and (pointer, size) in seen:
            continue  # tied weights count once
        seen.add((pointer, size))
        total += size
    return total


def _populate(model: Any) -> None:
    """Map in the pages of the weights the quantized model keeps (the int8 file's, when mapped):
    the float weights were loaded without (:func:`modelcache._prefault.deferred`)."""
    from ._prefault import populate

    populate(_leaf_tensors(list(model.state_dict().values())))


def _leaf_tensors(tensors: list[Any]) -> Iterator[Any]:
    for tensor in tensors:
        if tensor is None:
            continue
        if _is_wrapper(tensor):
            names, _ = tensor.__tensor_flatten__()
            yield from _leaf_tensors([getattr(tensor, n, None) for n in names])
        else:
            yield tensor


# -- the derived cache entry --------------------------------------------------------------------


def derived_key(identity: str, method: str, structure: str, torchao_version: str) -> str:
    """The cache key of quantized weights: what they were made from and with."""
    import torch

    parts = {
        "format": _FORMAT,
        "source": identity,
        "method": method,
        "scheme": _SCHEME,
        "torch": torch.__version__,
        "torchao": torchao_version,
        "structure": structure,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _source_identity(sha256: str | None, path: Path | None) -> str | None:
    """The source's sha256; for local files given without one, their size and mtime."""
    if sha256:
        return f"sha256:{sha256}"
    if path is None:
        return None
    with contextlib.suppress(OSError):
        if path.is_file():
            st = path.stat()
            return f"local:{path.absolute()}:{st.st_size}:{st.st_mtime_ns}"
    return None


def _structure(model: Any, layers: dict[str, Any]) -> str:
    """A digest of the state dict's names, shapes and dtypes and of which layers get int8."""
    described: list[Any] = [
        [key, list(tensor.shape), str(tensor.dtype)] for key, tensor in model.state_dict().items()
    ]
    described.append(sorted(f"{fqn}:{type(m).__qualname__}" for fqn, m in layers.items()))
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def _quantize_cached(
    model: Any,
    layers: dict[str, Any],
    info: dict[str, Any],
    cache: Cache,
    key: str,
    name: str,
    source: str,
    path: Path | None,
) -> None:
    """Map the cached int8 weights, or quantize now and publish them for the next start."""
    stem = path.name.split(".")[0] if path is not None and path.name else "model"
    label = f"modelcache+int8://{key[:16]}/{stem}.int8.pt"

    def produce(part: Path) -> None:
        _quantize_now(layers, info, name, source)
        try:
            _save(model, layers, part)
        except Exception as error:
            raise _NotCached(f"{type(error).__name__}: {error}") from error

    try:
        fetched = cache.derive(key, label, produce, model=name)
    except (_NotCached, OSError, LockTimeoutError) as error:
        log.warning("model %s: int8 weights not cached (%s)", name, error)
        if info["quantize_s"] is None:
            _quantize_now(layers, info, name, source)
        return
    info["cache_key"] = key
    info["cache_hit"] = fetched.cache_hit
    started = time.monotonic()
    if not _adopt(model, layers, fetched.path, name):
        if info["quantize_s"] is None:
            _quantize_now(layers, info, name, source)
        info["cache_hit"] = False
        return
    info["cached_load_s"] = round(time.monotonic() - started, 4)
    if not fetched.cache_hit:
        _trim()  # the int8 tensors made here were just replaced by the mapped file's


def _weight_key(fqn: str) -> str:
    return f"{fqn}.weight" if fqn else "weight"


def _save(model: Any, layers: dict[str, Any], part: Path) -> None:
    """Write the quantized state dict as plain tensors (loadable with ``weights_only=True``)."""
    import torch

    quantized = {_weight_key(fqn) for fqn in layers}
    tensors: dict[str, Any] = {}
    int8: dict[str, Any] = {}
    for key, tensor in model.state_dict().items():
        if key in quantized:
            dtype = str(tensor.dtype).removeprefix("torch.")
            int8[key] = {"qdata": tensor.qdata, "scale": tensor.scale, "dtype": dtype}
        else:
            # a view of a larger storage (a bias mapped from the float file) would be saved
            # with all of that storage: 320 MiB of float weights in an 80 MiB int8 file
            whole = tensor.untyped_storage().nbytes() == tensor.nbytes
            tensors[key] = tensor if whole else tensor.clone()
    torch.save({"format": _PAYLOAD, "version": _FORMAT, "tensors": tensors, "int8": int8}, part)


def _adopt(model: Any, layers: dict[str, Any], path: Path, name: str) -> bool:
    """Replace the module's tensors with the cached int8 state dict at ``path`` (mapped).

    Returns False (the module untouched) when the file does not fit the module.
    """
    import torch

    from .int8 import Int8Weight

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if payload.get("format") != _PAYLOAD or payload.get("version") != _FORMAT:
            raise ValueError(f"not a {_PAYLOAD} v{_FORMAT} file")
        state = dict(payload["tensors"])
        for key, record in payload["int8"].items():
            state[key] = Int8Weight(
                record["qdata"], record["scale"], getattr(torch, record["dtype"])
            )
    except Exception as error:
        log.warning("model %s: cached int8 weights unreadable (%s); quantizing again", name, error)
        return False
    current = model.state_dict()
    misfits = sorted(
        set(current) ^ set(state)
        | {k for k in current.keys() & state.keys() if current[k].shape != state[k].shape}
        | {_weight_key(fqn) for fqn in layers} - set(payload["int8"])
    )
    if misfits:
        log.warning(
            "model %s: cached int8 weights do not fit the module (%s); quantizing again",
            name,
            ", ".join(misfits[:3]),
        )
        return False
    for module in layers.values():
        module.weight.requires_grad_(False)
    model.load_state_dict(state, strict=True, assign=True)
    return True


# -- imports ------------------------------------------------------------------------------------


def _import_torch(name: str, source: str) -> Any:
    try:
        import torch
    except ImportError as error:
        raise LoadError(
            f"int8 quantization needs torch and torchao: {INSTALL_HINT}", model=name, source=source
        ) from error
    return torch


def _torchao_version() -> str | None:
    """torchao's installed version, read without importing it (``None`` when not installed)."""
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


class _ImportNoise(logging.Filter):
    """Moves torchao's import-time chatter to DEBUG: CUDA-only kernels and triton that a CPU
    host does not have, and a torch deprecation notice about torchao's enums."""

    _LOGGERS = ("torchao", "torchao.kernel.intmm", "torch.utils._pytree")
    _PATTERNS = (
        "Failed to load ",
        "Detected no triton",
        "is an Enum subclass and is now natively supported",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(pattern in message for pattern in self._PATTERNS):
            log.debug("torchao import: %s", message)
            return False
        return True

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Filter the loggers torchao's import writes to, for the duration of the block."""
        loggers = [logging.getLogger(name) for name in self._LOGGERS]
        for logger in loggers:
            logger.addFilter(self)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(self)


def _import_torchao(name: str, source: str) -> str:
    """Import torchao quietly; its version. Missing -> :class:`LoadError` with the install hint."""
    try:
        with _ImportNoise().applied():
            import torchao
            import torchao.quantization
    except ImportError as error:
        raise LoadError(
            f"int8 quantization needs torchao: {INSTALL_HINT}", model=name, source=source
        ) from error
    return str(getattr(torchao, "__version__", "unknown"))
