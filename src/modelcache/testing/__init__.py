"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses modelcache.

- ``modelcache_home``: an empty cache in a temporary directory, set as ``MODELCACHE_HOME``.
- ``model_server``: a real HTTP server on 127.0.0.1 (:class:`ModelServer`) with Range support,
  per-path request and byte counts, and faults you can arm.
- ``fake_weights``: a factory writing small random weights of a real format.

``pip install 'modelcache[testing]'`` brings what they need (pytest, torch, safetensors, numpy).
Importing this module imports neither torch nor any web framework; nothing else in modelcache
imports this module (nor pytest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .fake_weights import FAKE_KINDS, write_fake_weights
from .server import ModelServer

__all__ = [
    "FAKE_KINDS",
    "ModelServer",
    "fake_weights",
    "model_server",
    "modelcache_home",
    "write_fake_weights",
]


@pytest.fixture
def modelcache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory, set as ``MODELCACHE_HOME`` for the test."""
    home = tmp_path / "modelcache-home"
    home.mkdir()
    monkeypatch.setenv("MODELCACHE_HOME", str(home))
    for name in (
        "MODELCACHE_OFFLINE",
        "MODELCACHE_READ_ONLY_PATHS",
        "MODELCACHE_STRATEGY",
        "MODELCACHE_QUANTIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def model_server() -> Iterator[ModelServer]:
    """A real HTTP server on 127.0.0.1; ``model_server.add(name, path_or_bytes)`` gives a URL."""
    with ModelServer() as server:
        yield server


@pytest.fixture
def fake_weights(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``fake_weights(kind="safetensors", size_bytes=..., **options) -> Path``.

    Kinds: ``safetensors``, ``state_dict`` (a ``torch.save``d dict of tensors), ``whisper``
    (openai-whisper's checkpoint layout, tiny dims) and ``sharp`` (the 1038 keys of Apple's
    Sharp checkpoint, dimensions capped small).
    """
    directory = tmp_path_factory.mktemp("fake-weights")
    counter = iter(range(1_000_000))

    def make(kind: str = "safetensors", size_bytes: int = 1 << 20, **options: Any) -> Path:
        target = directory / f"{next(counter)}"
        target.mkdir()
        return write_fake_weights(target, kind, size_bytes=size_bytes, **options)

    return make
