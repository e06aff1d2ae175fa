"""The ``fake_weights`` fixture writes files in the real checkpoints' formats."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelcache.testing import FAKE_KINDS
from modelcache.testing.fake_weights import WHISPER_TEST_DIMS, WHISPER_TINY_DIMS, sharp_manifest

FakeWeights = Callable[..., Path]
SHARED_MANIFEST = (
    Path(__file__).resolve().parents[2] / "shared/fixtures/sharp_state_dict_manifest.json"
)


def test_kinds_are_listed() -> None:
    assert FAKE_KINDS == ("safetensors", "state_dict", "whisper", "sharp")


def test_safetensors_and_state_dict_hold_about_size_bytes(fake_weights: FakeWeights) -> None:
    tensors = load_file(str(fake_weights("safetensors", size_bytes=200_000)))
    assert 150_000 < sum(t.numel() * 4 for t in tensors.values()) < 260_000
    state = torch.load(fake_weights("state_dict", size_bytes=200_000), weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert 150_000 < sum(t.numel() * 4 for t in state.values()) < 260_000


def test_whisper_has_tiny_checkpoint_layout(fake_weights: FakeWeights) -> None:
    path = fake_weights("whisper")
    checkpoint = torch.load(path, weights_only=True, mmap=True)
    assert set(checkpoint) == {"dims", "model_state_dict"}
    assert checkpoint["dims"] == dict(WHISPER_TINY_DIMS)
    state = checkpoint["model_state_dict"]
    assert len(state) == 167
    assert {t.dtype for t in state.values()} == {torch.float16}
    buffer = state["encoder.positional_embedding"].numel()  # a buffer, not a parameter
    assert sum(t.numel() for t in state.values()) - buffer == 37_184_640  # tiny's parameters
    assert 70 << 20 < path.stat().st_size < 74 << 20  # "about 72 MiB", like the real file
    assert state["decoder.positional_embedding"].abs().sum() > 0
    assert torch.isfinite(state["decoder.positional_embedding"].float()).all()


def test_whisper_keys_and_shapes_match_openai_whisper(fake_weights: FakeWeights) -> None:
    from whisper.model import ModelDimensions, Whisper

    from modelcache.recipes import _ParametersOnMeta

    for dims in (WHISPER_TINY_DIMS, WHISPER_TEST_DIMS):
        checkpoint = torch.load(fake_weights("whisper", **dims), weights_only=True, mmap=True)
        with _ParametersOnMeta():  # shapes without allocating tiny's weights
            model = Whisper(ModelDimensions(**checkpoint["dims"]))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in checkpoint["model_state_dict"].items()}
        assert list(got) == list(expected)
        assert got == expected
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])  # strict, as whisper.load_model does


def test_whisper_options_shrink_the_file(fake_weights: FakeWeights) -> None:
    small = fake_weights("whisper", **WHISPER_TEST_DIMS)
    assert small.stat().st_size < 8 << 20
    checkpoint = torch.load(small, weights_only=True)
    assert checkpoint["dims"]["n_text_state"] == 64
    with pytest.raises(TypeError, match="n_layers"):
        fake_weights("whisper", n_layers=2)
    with pytest.raises(ValueError, match="n_audio_head"):
        fake_weights("whisper", n_audio_state=64)  # 64 is not divisible by tiny's 6 heads


def test_sharp_has_the_manifests_keys_capped(fake_weights: FakeWeights) -> None:
    path = fake_weights("sharp")
    state = torch.load(path, weights_only=True, mmap=True)
    manifest = sharp_manifest()
    assert list(state) == list(manifest)
    assert len(state) == 1038
    for key, (shape, dtype) in manifest.items():
        assert state[key].dtype == torch.float32 == getattr(torch, dtype.split(".")[1])
        assert tuple(state[key].shape) == tuple(min(d, 4) for d in shape)
    assert 400_000 < path.stat().st_size < 500_000  # "cap 4 gives a 447 KB file"
    smaller = torch.load(fake_weights("sharp", cap=2), weights_only=True)
    assert max(max(t.shape) for t in smaller.values()) == 2


def test_packaged_sharp_manifest_is_the_shared_fixture() -> None:
    # the package's copy is all an installed user has; in the repo, compare with the fixture
    shared = json.loads(SHARED_MANIFEST.read_text()) if SHARED_MANIFEST.exists() else None
    manifest = sharp_manifest()
    total = sum(math.prod(shape) for shape, _ in manifest.values())
    assert total == 702_305_169  # Sharp's parameter count
    if shared is not None:
        assert list(manifest) == list(shared["keys"])
        assert total == shared["n_params"]


def test_unknown_kind_and_options_are_refused(fake_weights: FakeWeights) -> None:
    with pytest.raises(ValueError, match="unknown fake weights kind"):
        fake_weights("onnx")
    with pytest.raises(TypeError, match="cap"):
        fake_weights("state_dict", cap=3)
    assert fake_weights("sharp", file_name="sharp-abc.pt").name == "sharp-abc.pt"


def test_a_missing_dependency_names_the_testing_extra(
    fake_weights: FakeWeights, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)  # as in a venv without numpy
    with pytest.raises(ModuleNotFoundError, match=r"numpy.*pip install 'modelcache\[testing\]'"):
        fake_weights("safetensors", size_bytes=10_000)
