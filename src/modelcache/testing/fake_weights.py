"""Small random weights in the formats real checkpoints use (torch imported on call).

Kinds:

- ``safetensors``: ``layers.N.weight``/``bias`` float32 tensors in a ``.safetensors`` file,
  about ``size_bytes`` in total.
- ``state_dict``: the same tensors ``torch.save``d as a plain dict (``.pt``).
- ``whisper``: openai-whisper's checkpoint layout, ``{"dims": {...}, "model_state_dict": {...}}``
  with float16 tensors under the exact keys and shapes ``whisper.Whisper`` has (167 tensors for
  tiny). Tiny's dimensions by default; any ``ModelDimensions`` field can be given as an option
  (``n_audio_state=64, n_text_state=64, n_audio_ctx=100`` ...) for a smaller, faster file.
- ``sharp``: the 1038 keys of Apple's Sharp checkpoint (``torch.save``d plain float32 state
  dict), each dimension capped at ``cap`` (default 4, ~450 KB); ``cap=None`` is full size
  (2.8 GB, for benchmarks).

``size_bytes`` applies to ``safetensors`` and ``state_dict``; the dimensions of ``whisper`` and
``sharp`` come from their options. No kind needs openai-whisper or ml-sharp installed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "FAKE_KINDS",
    "WHISPER_TEST_DIMS",
    "WHISPER_TINY_DIMS",
    "sharp_manifest",
    "whisper_state_shapes",
    "write_fake_weights",
]

FAKE_KINDS = ("safetensors", "state_dict", "whisper", "sharp")

WHISPER_TINY_DIMS: Mapping[str, int] = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 51865,
    "n_text_ctx": 448,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 4,
}
"""``ModelDimensions`` of openai-whisper's ``tiny`` (``tiny.en`` has ``n_vocab`` 51864)."""

WHISPER_TEST_DIMS: Mapping[str, int] = {
    **WHISPER_TINY_DIMS,
    "n_audio_state": 64,
    "n_audio_head": 2,
    "n_audio_layer": 2,
    "n_text_state": 64,
    "n_text_head": 2,
    "n_text_layer": 2,
}
"""Small dimensions (a ~7 MB file) that still run ``transcribe``: 80 mels, 1500 audio frames,
the full multilingual vocabulary. Use as ``fake_weights("whisper", **WHISPER_TEST_DIMS)``."""

_SHARP_MANIFEST = Path(__file__).with_name("sharp_manifest.json")


def _linear_state_dict(size_bytes: int, seed: int) -> dict[str, Any]:
    """A state dict of ``layers.N.weight``/``bias`` float32 tensors totalling ~``size_bytes``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    width = max(4, min(1024, int(math.sqrt(max(size_bytes, 64) / 4))))
    per_layer = (width * width + width) * 4
    layers = max(1, round(size_bytes / per_layer))
    state: dict[str, Any] = {}
    for n in range(layers):
        state[f"layers.{n}.weight"] = torch.randn(width, width, generator=generator)
        state[f"layers.{n}.bias"] = torch.randn(width, generator=generator)
    return state


# -- whisper --------------------------------------------------------------------------------------


def _attention(prefix: str, n_state: int) -> list[tuple[str, tuple[int, ...]]]:
    square = (n_state, n_state)
    return [
        (f"{prefix}.query.weight", square),
        (f"{prefix}.query.bias", (n_state,)),
        (f"{prefix}.key.weight", square),  # whisper's key projection has no bias
        (f"{prefix}.value.weight", square),
        (f"{prefix}.value.bias", (n_state,)),
        (f"{prefix}.out.weight", square),
        (f"{prefix}.out.bias", (n_state,)),
    ]


def _block(prefix: str, n_state: int, cross: bool) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [*_attention(f"{prefix}.attn", n_state), *_norm(f"{prefix}.attn_ln", n_state)]
    if cross:
        shapes += [
            *_attention(f"{prefix}.cross_attn", n_state),
            *_norm(f"{prefix}.cross_attn_ln", n_state),
        ]
    n_mlp = 4 * n_state
    shapes += [
        (f"{prefix}.mlp.0.weight", (n_mlp, n_state)),
        (f"{prefix}.mlp.0.bias", (n_mlp,)),
        (f"{prefix}.mlp.2.weight", (n_state, n_mlp)),
        (f"{prefix}.mlp.2.bias", (n_state,)),
        *_norm(f"{prefix}.mlp_ln", n_state),
    ]
    return shapes


def _norm(prefix: str, n_state: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (n_state,)), (f"{prefix}.bias", (n_state,))]


def whisper_state_shapes(dims: Mapping[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """``(key, shape)`` of each tensor of a Whisper checkpoint of ``dims``, in the model's order."""
    audio, text = dims["n_audio_state"], dims["n_text_state"]
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("encoder.positional_embedding", (dims["n_audio_ctx"], audio)),
        ("encoder.conv1.weight", (audio, dims["n_mels"], 3)),
        ("encoder.conv1.bias", (audio,)),
        ("encoder.conv2.weight", (audio, audio, 3)),
        ("encoder.conv2.bias", (audio,)),
    ]
    for n in range(dims["n_audio_layer"]):
        shapes += _block(f"encoder.blocks.{n}", audio, cross=False)
    shapes += _norm("encoder.ln_post", audio)
    shapes += [
        ("decoder.positional_embedding", (dims["n_text_ctx"], text)),
        ("decoder.token_embedding.weight", (dims["n_vocab"], text)),
    ]
    for n in range(dims["n_text_layer"]):
        shapes += _block(f"decoder.blocks.{n}", text, cross=True)
    shapes += _norm("decoder.ln", text)
    return shapes


def _is_layer_norm(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return leaf.endswith("_ln") or leaf in ("ln", "ln_post")


def _sinusoids(length: int, channels: int) -> Any:
    """Whisper's sinusoidal position embedding for the audio encoder."""
    import torch

    half = channels // 2
    increment = math.log(10000) / max(half - 1, 1)
    inv = torch.exp(-increment * torch.arange(half))
    scaled = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def _whisper_checkpoint(seed: int, options: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    unknown = set(options) - set(WHISPER_TINY_DIMS)
    if unknown:
        raise TypeError(
            f"unknown whisper option(s) {sorted(unknown)}; dims: {list(WHISPER_TINY_DIMS)}"
        )
    dims = {**WHISPER_TINY_DIMS, **{k: int(v) for k, v in options.items()}}
    for width, head in (("n_audio_state", "n_audio_head"), ("n_text_state", "n_text_head")):
        if dims[width] % dims[head] or dims[width] % 2:
            raise ValueError(
                f"{width}={dims[width]} must be even and divisible by {head}={dims[head]}"
            )
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for key, shape in whisper_state_shapes(dims):
        module, _, leaf = key.rpartition(".")
        if key == "encoder.positional_embedding":
            tensor = _sinusoids(*shape)
        elif _is_layer_norm(module):
            tensor = torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
        else:  # decoder.positional_embedding included: torch.empty in Whisper, filled here
            tensor = torch.randn(shape, generator=generator) * 0.02
        state[key] = tensor.to(torch.float16)
    return {"dims": dims, "model_state_dict": state}


# -- sharp ----------------------------------------------------------------------------------------


@cache
def sharp_manifest() -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> ``(shape, dtype)`` of Apple's Sharp checkpoint, in the checkpoint's order."""
    data = json.loads(_SHARP_MANIFEST.read_text())
    return {key: (tuple(shape), dtype) for key, (shape, dtype) in data["keys"].items()}


def _sharp_state_dict(seed: int, cap: int | None) -> dict[str, Any]:
    import torch

    if cap is not None and cap < 1:
        raise ValueError(f"cap must be a positive number of elements per dimension, got {cap}")
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for key, (shape, _dtype) in sharp_manifest().items():
        size = shape if cap is None else tuple(min(d, cap) for d in shape)
        state[key] = torch.randn(size, generator=generator) * 0.02
    return state


# -- entry point ----------------------------------------------------------------------------------


#: what writing needs, all in the ``testing`` extra (safetensors' ``save_file`` imports numpy)
_NEEDS = ("torch", "safetensors", "numpy")


def write_fake_weights(
    directory: Path,
    kind: str = "safetensors",
    *,
    size_bytes: int = 1 << 20,
    seed: int = 0,
    **options: Any,
) -> Path:
    """Write fake weights of ``kind`` into ``directory``; the file's ``Path``.

    Options: ``whisper`` takes ``ModelDimensions`` fields; ``sharp`` takes ``cap`` (the largest
    size of any dimension, ``None`` for full size). ``file_name`` names the file for every kind.
    Without torch, safetensors or numpy, ``ModuleNotFoundError`` names the ``testing`` extra.
    """
    try:
        return _write(directory, kind, size_bytes, seed, options)
    except ModuleNotFoundError as error:
        if error.name not in _NEEDS:
            raise
        raise ModuleNotFoundError(
            f"fake weights need {error.name} (No module named {error.name!r}): "
            "pip install 'modelcache[testing]'",
            name=error.name,
        ) from error


def _write(directory: Path, kind: str, size_bytes: int, seed: int, options: dict[str, Any]) -> Path:
    file_name = options.pop("file_name", None)
    if kind == "safetensors":
        from safetensors.torch import save_file

        _no_options(kind, options)
        path = directory / (file_name or "model.safetensors")
        save_file(_linear_state_dict(size_bytes, seed), str(path))
        return path

    import torch

    if kind == "state_dict":
        _no_options(kind, options)
        payload: Any = _linear_state_dict(size_bytes, seed)
        default_name = "model.pt"
    elif kind == "whisper":
        payload = _whisper_checkpoint(seed, options)
        default_name = "whisper.pt"
    elif kind == "sharp":
        cap = options.pop("cap", 4)
        _no_options(kind, options)
        payload = _sharp_state_dict(seed, cap)
        default_name = "sharp_2572gikvuh.pt"
    else:
        raise ValueError(f"unknown fake weights kind {kind!r}; expected one of {FAKE_KINDS}")
    path = directory / (file_name or default_name)
    torch.save(payload, path)
    return path


def _no_options(kind: str, options: Mapping[str, Any]) -> None:
    if options:
        raise TypeError(f"fake weights of kind {kind!r} take no option(s) {sorted(options)}")
