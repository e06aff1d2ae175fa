"""Tests of your own service's model code with modelcache's pytest fixtures.

``pip install 'modelcache[testing]'`` and these run as they are: the fixtures come from the
plugin modelcache registers with pytest, so no conftest.py is needed.
"""

import hashlib

import pytest

from modelcache import IntegrityError, ModelHandle, Registry


def build_registry(url: str, sha256: str) -> Registry:
    """Your service's models (in your code base, not in the test)."""
    return Registry([ModelHandle("encoder", source=url, sha256=sha256, strategy="eager")])


def test_the_service_downloads_once_then_starts_from_the_cache(
    model_server, fake_weights, modelcache_home
):
    path = fake_weights("safetensors", size_bytes=1 << 20)  # ~1 MB of float32 tensors
    url = model_server.add("encoder.safetensors", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    first = build_registry(url, digest)
    first.start()
    assert first.ready
    assert first["encoder"].status()["cache_hit"] is False
    first.close()

    model_server.reset_counts()
    second = build_registry(url, digest)  # a restart: same cache ($MODELCACHE_HOME)
    second.start()
    assert second["encoder"].status()["cache_hit"] is True
    assert model_server.count("encoder.safetensors") == (0, 0)  # not one request
    second.close()


def test_a_cut_download_resumes(model_server, fake_weights, modelcache_home):
    path = fake_weights("safetensors", size_bytes=1 << 20)
    url = model_server.add("encoder.safetensors", path)
    model_server.cut_after("encoder.safetensors", 300_000)  # the connection drops once

    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    handle = ModelHandle("encoder", source=url, sha256=digest)

    assert "layers.0.weight" in handle.get()
    requests, sent = model_server.count("encoder.safetensors")
    assert requests >= 2
    assert sent < path.stat().st_size + 300_000  # the 300 KB before the cut were not sent again


def test_wrong_weights_never_reach_the_service(model_server, fake_weights, modelcache_home):
    url = model_server.add("encoder.safetensors", fake_weights("safetensors", seed=1))
    registry = build_registry(url, sha256="0" * 64)

    with pytest.raises(IntegrityError, match="encoder"):
        registry.start()
    assert not registry.ready
