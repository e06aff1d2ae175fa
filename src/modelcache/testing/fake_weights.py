"""Small random weights in the formats real checkpoints use (torch imported on call)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["FAKE_KINDS", "write_fake_weights"]

FAKE_KINDS = ("safetensors", "state_dict")


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


def write_fake_weights(directory: Path, kind: str = "safetensors", *, size_bytes: int = 1 << 20,
                       seed: int = 0, **options: Any) -> Path:
    """Write fake weights of ``kind`` into ``directory``; the file's ``Path``."""
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = directory / "model.safetensors"
        save_file(_linear_state_dict(size_bytes, seed), str(path))
        return path
    if kind == "state_dict":
        import torch

        path = directory / "model.pt"
        torch.save(_linear_state_dict(size_bytes, seed), path)
        return path
    raise ValueError(f"unknown fake weights kind {kind!r}; expected one of {FAKE_KINDS}")
