"""Ready handles for known checkpoints: OpenAI Whisper (every size) and Apple's Sharp.

.. code-block:: python

    from modelcache import recipes

    asr = recipes.whisper("base.en", strategy="background")   # a ModelHandle
    model = asr.get()        # a whisper.Whisper with openai-whisper installed, else the checkpoint

Every keyword argument of :class:`~modelcache.ModelHandle` may be given (``source=`` for a
mirror, ``cache=``, ``quantize=``, ``strategy=`` ...). Nothing heavy is imported until a model
loads.
"""

from __future__ import annotations

import base64
import gzip
import io
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import shorten
from .handle import ModelHandle

__all__ = [
    "SHARP_URL",
    "WHISPER_MODELS",
    "adopt",
    "build_whisper",
    "sharp",
    "sharp_loader",
    "whisper",
    "whisper_loader",
    "whisper_sha256",
    "whisper_url",
]

log = logging.getLogger("modelcache")

_WHISPER_BASE = "https://openaipublic.azureedge.net/main/whisper/models"
_WHISPER_FILES = {
    "tiny.en": "d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03/tiny.en.pt",
    "tiny": "65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9/tiny.pt",
    "base.en": "25a8566e1d0c1e2231d1c762132cd20e0f96a85d16145c3a00adf5d1ac670ead/base.en.pt",
    "base": "ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e/base.pt",
    "small.en": "f953ad0fd29cacd07d5a9eda5624af0f6bcf2258be67c92b79389873d91e0872/small.en.pt",
    "small": "9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794/small.pt",
    "medium.en": "d7440d1dc186f76616474e0ff0b3b6b879abc9d1a4926b7adfa41db2d497ab4f/medium.en.pt",
    "medium": "345ae4da62f9b3d59415adc60127b97c714f32e89e936602e85993674d08dcb1/medium.pt",
    "large-v1": "e4b87e7e0bf463eb8e6956e646f1e277e901512310def2c24bf0e11bd3c28e9a/large-v1.pt",
    "large-v2": "81f7c96c852ee8fc832187b0132e569d6c3065a3252ed18e56effd0b6a73e524/large-v2.pt",
    "large-v3": "e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb/large-v3.pt",
    "large": "e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb/large-v3.pt",
    "large-v3-turbo": (
        "aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a/large-v3-turbo.pt"
    ),
    "turbo": "aff26ae408abcba5fbf8813c21e62b0941638c5f6eebfb145be0c9839262a19a/large-v3-turbo.pt",
}
_WHISPER_URLS = {size: f"{_WHISPER_BASE}/{path}" for size, path in _WHISPER_FILES.items()}

WHISPER_MODELS: Mapping[str, str] = MappingProxyType(_WHISPER_URLS)
"""openai-whisper's checkpoints: size -> URL (the sha256 of the file is the URL's last folder)."""

SHARP_URL = "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt"
"""Apple's Sharp checkpoint (2.8 GB; licensed for non-commercial research only; Apple
publishes no sha256 for it)."""

Loader = Callable[[Path], Any]


# -- whisper --------------------------------------------------------------------------------------


def whisper_url(size: str) -> str:
    """The official URL of Whisper ``size`` (``tiny`` ... ``large-v3-turbo``, ``.en`` variants)."""
    try:
        return _WHISPER_URLS[size]
    except KeyError:
        raise ValueError(
            f"unknown whisper size {size!r}; available: {', '.join(_WHISPER_URLS)}"
        ) from None


def whisper_sha256(size: str) -> str:
    """The sha256 of Whisper ``size``'s checkpoint (the folder name in its URL)."""
    return whisper_url(size).rsplit("/", 2)[-2]


def whisper(size: str = "tiny", *, name: str | None = None, **handle_kwargs: Any) -> ModelHandle:
    """A :class:`~modelcache.ModelHandle` for openai-whisper's checkpoint ``size``.

    The handle's name is ``whisper-<size>`` unless ``name`` is given. ``source`` defaults to
    OpenAI's URL and ``sha256`` to the official digest (a mirror serving the same file keeps
    it; pass ``sha256=`` for another file, or ``None`` to skip the check). The loader returns a
    ready ``whisper.Whisper`` when openai-whisper is installed (see :func:`whisper_loader`),
    else the checkpoint dict ``{"dims": ..., "model_state_dict": ...}``.
    """
    url = whisper_url(size)
    kwargs: dict[str, Any] = dict(handle_kwargs)
    kwargs.setdefault("source", url)
    kwargs.setdefault("sha256", whisper_sha256(size))
    kwargs.setdefault("loader", whisper_loader(size, device=kwargs.get("device", "cpu")))
    return ModelHandle(name or f"whisper-{size}", **kwargs)


def whisper_loader(
    size: str | None = None, *, device: str = "cpu", in_memory: bool = False
) -> Loader:
    """A loader for Whisper checkpoints: a ``whisper.Whisper`` if openai-whisper is importable.

    The checkpoint is memory-mapped (``weights_only=True``) and the model is built on the meta
    device, so its weights are never held twice (see :func:`build_whisper`). ``size`` picks the
    official alignment heads, as ``whisper.load_model(size)`` does. Without openai-whisper the
    loader returns the checkpoint dict, its tensors mapped to ``device``. ``in_memory=True``
    reads the file into memory instead of mapping it.
    """

    def load(path: Path) -> Any:
        whisper_module = _import_whisper()
        if whisper_module is None:
            return _read_checkpoint(path, device, in_memory)
        checkpoint = _read_checkpoint(path, "cpu", in_memory)
        heads = getattr(whisper_module, "_ALIGNMENT_HEADS", {}).get(size) if size else None
        return build_whisper(checkpoint, alignment_heads=heads, device=device)

    return load


def _import_whisper() -> Any:
    """openai-whisper's package, or ``None`` (also when another ``whisper`` is installed)."""
    try:
        import whisper
        import whisper.model  # graphite's unrelated "whisper" has no .model
    except ImportError:
        return None
    return whisper


def _read_checkpoint(path: Path, device: str, in_memory: bool) -> Any:
    import torch

    if in_memory:
        data = io.BytesIO(Path(path).read_bytes())
        return torch.load(data, map_location=device, weights_only=True)
    from .loaders import load_torch

    return load_torch(Path(path), device)


def build_whisper(
    checkpoint: Mapping[str, Any],
    *,
    alignment_heads: bytes | None = None,
    device: str = "cpu",
) -> Any:
    """A ``whisper.Whisper`` filled from a checkpoint dict without holding the weights twice.

    The model's parameters are created on the meta device (no memory, no random
    initialisation) and adopt the checkpoint's tensors with ``load_state_dict(assign=True)``.
    The float16 weights are converted to float32 first, as ``whisper.load_model`` does (it
    copies them into a float32 model); float32 checkpoints are adopted as they are, still
    memory-mapped. The non-persistent buffers are real: ``decoder.mask`` is computed as
    Whisper's constructor does, and ``alignment_heads`` (the base85 dump ``whisper.load_model``
    uses for the official sizes) replaces the default heads when it fits the model.
    """
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(**checkpoint["dims"])
    state = {key: value.float() for key, value in checkpoint["model_state_dict"].items()}

    def fix_buffers(model: Any) -> None:  # the causal mask starts from torch.empty
        n_ctx = dims.n_text_ctx
        mask = torch.empty(n_ctx, n_ctx).fill_(-math.inf).triu_(1)
        model.decoder.register_buffer("mask", mask, persistent=False)

    model = adopt(lambda: Whisper(dims), state, fix=fix_buffers)
    del state
    if alignment_heads is not None:
        _set_alignment_heads(model, alignment_heads)
    return model.to(device).eval()


def _set_alignment_heads(model: Any, dump: bytes) -> None:
    """``model.set_alignment_heads(dump)`` when the dump fits the model's decoder."""
    import numpy as np

    size = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool).size
    if size == model.dims.n_text_layer * model.dims.n_text_head:
        model.set_alignment_heads(dump)
    else:
        log.debug("whisper: alignment heads for another size (%d heads); keeping the default", size)


class _ParametersOnMeta:
    """Create every ``torch.empty`` tensor on the meta device while a constructor runs.

    Layers create their parameters with ``torch.empty`` and then initialise them in place, so
    on meta they take no memory and no time, while the small buffers a constructor computes
    (Whisper's sinusoids, its alignment heads) stay real. Initialisers (``normal_``,
    ``uniform_`` ...) of meta tensors are skipped: ``normal_`` on meta runs through
    ``torch._refs``, whose first use imports ``torch._dynamo`` (1 s or more, 70 MB). A
    whole-model ``torch.device("meta")`` would hit that and also fail on Whisper's
    ``to_sparse``.
    """

    def __enter__(self) -> _ParametersOnMeta:
        import torch
        from torch.overrides import TorchFunctionMode

        class Mode(TorchFunctionMode):
            def __torch_function__(
                self, func: Any, types: Any, args: Any = (), kwargs: Any = None
            ) -> Any:
                kwargs = kwargs or {}
                if func is torch.empty and kwargs.get("device") in (None, "cpu"):
                    kwargs = {**kwargs, "device": "meta"}
                elif _in_place(func):
                    target = args[0] if args else kwargs.get("tensor")
                    if getattr(target, "is_meta", False):
                        return target  # initialising a meta tensor: nothing to do
                return func(*args, **kwargs)

        self._mode = Mode()
        self._mode.__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)  # type: ignore[no-untyped-call]


def _in_place(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


# -- sharp ----------------------------------------------------------------------------------------


def sharp(*, name: str = "sharp", **handle_kwargs: Any) -> ModelHandle:
    """A :class:`~modelcache.ModelHandle` for Apple's Sharp checkpoint (:data:`SHARP_URL`).

    The weights are licensed for non-commercial research only: the recipe points at Apple's
    URL and ships nothing. Apple publishes no sha256; pass ``sha256=`` to pin the file you
    checked (``modelcache ls --json`` shows the digest computed on the first download).
    The loader (:func:`sharp_loader`) returns ml-sharp's predictor when the ``sharp`` package
    of apple/ml-sharp is importable, else the state dict.
    """
    kwargs: dict[str, Any] = dict(handle_kwargs)
    kwargs.setdefault("source", SHARP_URL)
    kwargs.setdefault("loader", sharp_loader(device=kwargs.get("device", "cpu")))
    return ModelHandle(name, **kwargs)


def sharp_loader(*, device: str = "cpu", predictor: bool | None = None) -> Loader:
    """A loader for Sharp checkpoints (a plain ``torch.save``d state dict).

    ``predictor=None`` (default): ml-sharp's ``RGBGaussianPredictor`` in eval mode when
    ``sharp.models.create_predictor`` is importable, else the state dict (memory-mapped,
    ``weights_only=True``). If ml-sharp is installed but its predictor cannot be built, for any
    reason (a dependency that fails to import: PyPI's CUDA torchvision beside a CPU torch raises
    ``RuntimeError``), a warning says why and the state dict is returned. ``True`` requires the
    predictor; ``False`` always returns the state dict. The predictor's parameters are created
    on the meta device and adopt the mapped tensors (:func:`adopt`), so the 2.8 GB of weights
    are not held twice; a checkpoint that does not fit the predictor is an error.
    """

    def load(path: Path) -> Any:
        from .loaders import load_torch

        if predictor is False:
            return load_torch(Path(path), device)
        try:
            factory = _sharp_factory()
            if factory is not None:
                state = load_torch(Path(path), "cpu")
                return adopt(factory, state).eval().to(device)
            if predictor:
                raise ImportError(
                    "ml-sharp's 'sharp' package is not importable; install it from "
                    "https://github.com/apple/ml-sharp (pip install -e .) to get the predictor"
                )
        except _PredictorUnavailable as error:
            if predictor:
                raise RuntimeError(f"ml-sharp's predictor {error}") from error.__cause__
            why = shorten(str(error))
            log.warning("sharp: ml-sharp's predictor %s; loading the state dict instead", why)
        return load_torch(Path(path), device)

    return load


class _PredictorUnavailable(Exception):
    """ml-sharp is installed but its predictor could not be built; the cause is chained."""


def _sharp_factory() -> Callable[[], Any] | None:
    """``create_predictor(PredictorParams())`` of apple/ml-sharp, or ``None`` if not installed.

    PyPI's unrelated ``sharp`` (a libsharp wrapper) has no ``sharp.models``: it counts as absent.
    Any other failure to import it, and any failure of the (third-party) constructor, raises
    :class:`_PredictorUnavailable` saying why.
    """
    try:
        from sharp.models import PredictorParams, create_predictor
    except ModuleNotFoundError as error:
        if error.name in ("sharp", "sharp.models"):
            return None
        raise _PredictorUnavailable(f"cannot be imported ({_why(error)})") from error
    except Exception as error:
        raise _PredictorUnavailable(f"cannot be imported ({_why(error)})") from error

    def factory() -> Any:
        try:
            return create_predictor(PredictorParams())
        except Exception as error:
            raise _PredictorUnavailable(f"could not be built ({_why(error)})") from error

    return factory


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def adopt(
    factory: Callable[[], Any],
    state: Mapping[str, Any],
    *,
    strict: bool = True,
    fix: Callable[[Any], None] | None = None,
) -> Any:
    """``factory()`` filled with ``state``'s tensors without holding the weights twice.

    The module's parameters are created on the meta device (see :class:`_ParametersOnMeta`)
    and adopt ``state``'s (memory-mapped) tensors with ``load_state_dict(assign=True)``.
    ``fix(module)`` may then give real values to buffers left on meta. If the constructor
    cannot run that way, or some tensor stays on meta, the module is built normally and
    ``state`` copied into it (what ``whisper.load_model`` and ml-sharp's CLI do).
    """
    try:
        with _ParametersOnMeta():
            module = factory()
    except Exception as error:  # an operation that cannot mix meta and real tensors
        why = shorten(str(error))
        log.debug("building with parameters on meta failed (%s); building normally", why)
    else:
        module.load_state_dict(state, strict=strict, assign=True)
        if fix is not None:
            fix(module)
        leftovers = _on_meta(module)
        if not leftovers:
            return module
        log.debug("%s left on the meta device; building the module normally", leftovers[:5])
    module = factory()
    module.load_state_dict(state, strict=strict)
    return module


def _on_meta(module: Any) -> list[str]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.is_meta]
