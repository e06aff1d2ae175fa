"""A cold start of real safetensors over HTTP: READY only once the whole file's sha256 matched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelcache import Cache, IntegrityError, ModelHandle, State
from modelcache.testing import ModelServer

MiB = 1 << 20

pytest_plugins = ["servers.fixtures"]


def _weights(path: Path, tensors: int = 8, rows: int = 256) -> str:
    """A safetensors file of ``tensors`` float32 tensors (``rows`` x 1024); its sha256."""
    generator = torch.Generator().manual_seed(7)
    save_file(
        {f"layer.{i}.weight": torch.randn(rows, 1024, generator=generator) for i in range(tensors)},
        str(path),
    )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _watch(handle: ModelHandle, seen: list[tuple[str, int, int | None]]) -> threading.Event:
    """Record ``(state, bytes_done, bytes_total)`` every millisecond until the event is set."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.001):
            s = handle.status()
            seen.append((s["state"], s["bytes_done"], s["bytes_total"]))

    threading.Thread(target=run, daemon=True).start()
    return stop


def test_ready_comes_after_every_byte_and_the_tensors_are_the_files(
    model_server: ModelServer, cache: Cache, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    digest = _weights(path)  # 8 MiB
    url = model_server.add("model.safetensors", path)
    model_server.set_rate("model.safetensors", 16 * MiB)  # ~0.5 s: the watcher sees it arrive
    handle = ModelHandle("model", source=url, sha256=digest, cache=cache)
    seen: list[tuple[str, int, int | None]] = []
    stop = _watch(handle, seen)
    try:
        state = handle.get(timeout=60)
    finally:
        stop.set()
    size = path.stat().st_size
    assert any(s == State.FETCHING.value and 0 < done < size for s, done, _ in seen)
    assert all(done == size for s, done, _ in seen if s == State.READY.value)
    expected = load_file(str(path))
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert handle.status()["sha256"] == digest


@pytest.mark.parametrize("where", ["first tensor", "last byte"])
def test_a_flipped_byte_fails_the_cold_start_and_nothing_is_served(
    model_server: ModelServer, cache: Cache, tmp_path: Path, where: str
) -> None:
    path = tmp_path / "model.safetensors"
    digest = _weights(path)
    data = bytearray(path.read_bytes())
    at = len(data) - 1 if where == "last byte" else len(data) // 4
    data[at] ^= 0x01  # still a valid safetensors file: only the digest tells
    url = model_server.add("model.safetensors", bytes(data))
    handle = ModelHandle("cold-weights", source=url, sha256=digest, cache=cache)
    handle.retry_interval = 60.0  # a second get() sees this failure, not a new attempt
    with pytest.raises(IntegrityError) as caught:
        handle.get(timeout=60)
    assert caught.value.model == "cold-weights"
    assert "sha256 mismatch" in str(caught.value)
    assert handle.state is State.FAILED
    assert handle.status()["path"] is None
    assert cache.lookup(url, digest) is None
    assert not [p for p in (cache.path / "blobs").glob("*") if p.is_file()]
    with pytest.raises(IntegrityError):  # a caller arriving later gets the failure, no model
        handle.get(timeout=1)
    assert handle.state is State.FAILED


#: a fresh interpreter, torch not imported: a handle starts a cold load in the background; once
#: "torch" appears in sys.modules (modelcache began importing it), ``import torch`` waits for
#: that import to finish, then the handle's state says whether the bytes were still arriving
IMPORTS_DURING_DOWNLOAD = """
import json, sys, time
from modelcache import ModelHandle

url, digest, home = sys.argv[1:4]
handle = ModelHandle("weights", source=url, sha256=digest, cache=home, strategy="background")
handle.start()
deadline = time.monotonic() + 60
while "torch" not in sys.modules and time.monotonic() < deadline:
    time.sleep(0.005)
began = "torch" in sys.modules
if began:
    import torch  # returns once the import modelcache began is complete
status = handle.status()
print(json.dumps({"began": began, "state": status["state"], "done": status["bytes_done"],
                  "total": status["bytes_total"]}))
handle.close()
"""

#: ``ModelHandle.fetch()`` loads nothing, so it imports nothing the loader needs
FETCH_ONLY = """
import json, sys
from modelcache import ModelHandle

url, digest, home = sys.argv[1:4]
path = ModelHandle("weights", source=url, sha256=digest, cache=home).fetch()
print(json.dumps({"torch": "torch" in sys.modules, "size": path.stat().st_size}))
"""


def _child(script: str, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_cold_get_imports_the_loaders_modules_while_the_bytes_download(
    model_server: ModelServer, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    digest = _weights(path, tensors=64)  # 64 MiB
    url = model_server.add("model.safetensors", path)
    # 256 KiB/s a connection: ~16 s even over 16 connections, far longer than importing torch
    model_server.set_rate("model.safetensors", 256 * 1024)
    seen = _child(IMPORTS_DURING_DOWNLOAD, url, digest, str(tmp_path / "home"))
    assert seen["began"] is True
    assert seen["state"] == State.FETCHING.value
    assert seen["total"] in (None, path.stat().st_size)  # None: no answer had come in yet
    assert isinstance(seen["done"], int)
    assert seen["done"] < path.stat().st_size


def test_fetching_without_loading_imports_nothing_the_loader_needs(
    model_server: ModelServer, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    digest = _weights(path, tensors=2)
    url = model_server.add("model.safetensors", path)
    seen = _child(FETCH_ONLY, url, digest, str(tmp_path / "home"))
    assert seen == {"torch": False, "size": path.stat().st_size}
