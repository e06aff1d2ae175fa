"""Loaders: defaults by suffix, mmap, legacy checkpoints, refused pickles, directories, modules."""

from __future__ import annotations

import json
import os
import pickle
import re
import resource
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import inside, mapped_ranges, write_onnx_linear
from safetensors.torch import save, save_file
from servers.hub import HubStandIn

from modelcache import Cache, LoadError, ModelHandle
from modelcache.loaders import (
    UnsafeCheckpointError,
    _parameters_on_meta,
    build_on_meta,
    default_loader,
    from_pretrained,
    module_loader,
    preparation,
    sentence_transformer,
)
from modelcache.testing import ModelServer

MiB = 1 << 20

pytest_plugins = ["servers.fixtures"]


class Net(torch.nn.Module):
    """Linear layers, a persistent buffer and a non-persistent one computed in ``__init__``."""

    built: list[Net] = []

    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.norm = torch.nn.BatchNorm1d(width)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, width), persistent=False)
        Net.built.append(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.norm(x) * self.scale


def _reference(width: int = 64, depth: int = 3) -> Net:
    torch.manual_seed(0)
    net = Net(width, depth)
    net.norm.running_mean.uniform_()
    return net.eval()


def _handle(source: Any, cache: Cache, **options: Any) -> ModelHandle:
    return ModelHandle("model", source=source, cache=cache, **options)


# -- defaults by suffix ------------------------------------------------------------------------


def test_safetensors_over_http_are_mapped_not_copied(
    model_server: ModelServer, cache: Cache, fake_weights: Callable[..., Path]
) -> None:
    path = fake_weights("safetensors", size_bytes=2 * MiB)
    url = model_server.add("model.safetensors", path)
    state = _handle(url, cache).get()
    expected = default_loader(path)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    cached = Path(cache.lookup(url) or "")
    ranges = mapped_ranges(cached)
    assert ranges
    assert all(inside(t.data_ptr(), ranges) for t in state.values())


def _anonymous_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise LookupError("RssAnon")


def test_safetensors_pages_are_mapped_at_load_without_a_copy(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    tensors = {f"w{i}": torch.full((1024, 1024), float(i)) for i in range(16)}  # 64 MiB
    save_file(tensors, str(path))
    del tensors
    anonymous = _anonymous_bytes()
    state = default_loader(path)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = sum(float(t.view(-1)[::1024].sum()) for t in state.values())  # every page read once
    faults_reading = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert total == sum(i * 1024.0 * 1024 for i in range(16)) / 1024
    # without the pages mapped at load, reading these 16,384 pages takes ~110 page faults here
    # (the kernel maps a large folio per fault); with them mapped, ~10
    assert faults_reading < 50
    assert _anonymous_bytes() - anonymous < 8 * MiB  # mapped from the page cache, not copied
    ranges = mapped_ranges(path)
    assert all(inside(t.data_ptr(), ranges) for t in state.values())


def test_pages_are_mapped_in_pieces_on_two_threads_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from modelcache import _prefault

    monkeypatch.setattr(_prefault, "PIECE", 4 * MiB)  # 16 pieces of the 64 MiB file
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, str(path))
    anonymous = _anonymous_bytes()
    state = default_loader(path)
    assert _prefault.populate(state.values())  # the kernel mapped every piece
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total = sum(float(t.view(-1)[::1024].sum()) for t in state.values())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 50
    assert total == sum(i * 1024.0 * 1024 for i in range(16)) / 1024
    assert _anonymous_bytes() - anonymous < 8 * MiB


def test_safetensors_of_every_dtype_and_shape_load_as_safetensors_reads_them(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file

    path = tmp_path / "mixed.safetensors"
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2, 2).half(),
        "f64": torch.randn(3).double(),
        "i8": torch.arange(-5, 6, dtype=torch.int8),
        "u8": torch.arange(0, 9, dtype=torch.uint8),
        "i64": torch.arange(11),
        "flags": torch.tensor([True, False, True]),
        "f8": torch.randn(5).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    state = default_loader(path)
    expected = load_file(str(path))
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype
        assert state[name].shape == tensor.shape
        assert torch.equal(
            state[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        ), name
    state["f32"].add_(1)  # copy-on-write: the file keeps its bytes
    assert torch.equal(load_file(str(path))["f32"], tensors["f32"])


def test_a_broken_safetensors_file_fails_as_safetensors_says(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    save_file({"w": torch.ones(1024)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])  # cut short: the header names bytes not there
    with pytest.raises(Exception, match=r"(?i)invalid|incomplete|out of bounds|metadata"):
        default_loader(path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_files_load_with_mmap(
    suffix: str, cache: Cache, fake_weights: Callable[..., Path]
) -> None:
    saved = fake_weights("state_dict", size_bytes=1 * MiB)
    path = saved.with_suffix(suffix)
    saved.rename(path)
    state = _handle(path, cache).get()
    ranges = mapped_ranges(path)
    assert ranges
    assert all(inside(t.data_ptr(), ranges) for t in state.values())
    assert state["layers.0.weight"].dtype is torch.float32


def test_legacy_non_zip_checkpoints_load(cache: Cache, tmp_path: Path) -> None:
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    path = tmp_path / "legacy.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = _handle(path, cache).get()
    assert torch.equal(loaded["w"], state["w"])
    assert torch.equal(loaded["b"], state["b"])


def test_unknown_suffix_asks_for_a_loader(cache: Cache, tmp_path: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(LoadError, match=r"weights\.gguf.*pass loader="):
        _handle(path, cache).get()


# -- pickles that would run code ----------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker`` (it calls ``os.mkdir(marker)``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def _write_malicious(path: Path, marker: Path, kind: str) -> None:
    payload = {"weight": torch.zeros(2), "hook": _Payload(marker)}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize(
    ("kind", "name"),
    [("zip", "evil.pt"), ("legacy", "evil.pth"), ("raw", "evil.bin"), ("zip", "evil.ckpt")],
)
def test_a_pickle_that_would_run_code_is_refused(
    kind: str, name: str, model_server: ModelServer, cache: Cache, tmp_path: Path
) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / name
    _write_malicious(path, marker, kind)
    url = model_server.add(name, path)
    with pytest.raises(LoadError) as info:
        _handle(url, cache).get()
    assert not marker.exists()
    error = info.value
    assert isinstance(error.__cause__, UnsafeCheckpointError)
    assert error.model == "model"
    assert error.source == url
    assert "weights_only=True" in str(error)
    assert "never runs pickled code" in str(error)
    assert "GLOBAL" in str(error) or "global" in str(error)
    # the payload is real: an unsafe load would have run it
    with open(path, "rb") as f:
        torch.load(f, weights_only=False) if kind != "raw" else pickle.load(f)
    assert marker.is_dir()


# -- directories -------------------------------------------------------------------------------


def test_a_directory_source_hands_the_directory_to_a_custom_loader(
    cache: Cache, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "tokenizer").mkdir(parents=True)
    (repo / "config.json").write_text('{"width": 4}')
    (repo / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    seen: list[Path] = []

    def loader(path: Path) -> dict[str, str]:
        seen.append(path)
        return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*.*")}

    files = _handle(repo, cache, loader=loader).get()
    assert seen == [repo]  # used in place: a local directory is never copied
    assert files == {"config.json": '{"width": 4}', "tokenizer/vocab.txt": "a\nb\n"}


def test_the_default_loader_merges_a_directorys_safetensors_shards(
    cache: Cache, tmp_path: Path
) -> None:
    repo = tmp_path / "sharded"
    repo.mkdir()
    save_file({"a": torch.ones(2)}, str(repo / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(repo / "model-00002-of-00002.safetensors"))
    state = _handle(repo, cache).get()
    assert sorted(state) == ["a", "b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="pass loader="):
        ModelHandle("empty", source=empty, cache=cache).get()


# -- building on the meta device ---------------------------------------------------------------


def test_module_loader_adopts_the_mapped_tensors(
    model_server: ModelServer, cache: Cache, tmp_path: Path
) -> None:
    reference = _reference()
    path = tmp_path / "net.safetensors"
    save_file(reference.state_dict(), str(path))
    url = model_server.add("net.safetensors", path)
    Net.built.clear()
    net = _handle(url, cache, loader=module_loader(Net)).get()
    assert isinstance(net, Net)
    assert not net.training
    x = torch.randn(5, 64)
    assert torch.equal(net(x), reference(x))
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert torch.equal(net.scale, reference.scale)  # the non-persistent buffer: real values
    ranges = mapped_ranges(Path(cache.lookup(url) or ""))
    assert all(inside(p.data_ptr(), ranges) for p in net.parameters())  # no copy
    # Built on meta, then (for the buffer the file lacks) a twin with no weights. After other
    # tests ran in the process (seen after test_demo's), torch.linspace no longer follows the meta
    # device and the buffer is real from the first build: then no twin is needed.
    assert Net.built[0] is net
    assert len(Net.built) in (1, 2)
    for twin in Net.built[1:]:
        assert all(p.is_meta for p in twin.parameters())
        assert not any(b.is_meta for b in twin.buffers())


def test_module_loader_picks_a_nested_state_dict(cache: Cache, tmp_path: Path) -> None:
    reference = _reference(width=8, depth=1)
    path = tmp_path / "checkpoint.pt"
    torch.save({"dims": {"width": 8}, "model_state_dict": reference.state_dict()}, path)
    net = _handle(path, cache, loader=module_loader(lambda: Net(8, 1), key="model_state_dict"))
    x = torch.randn(2, 8)
    assert torch.equal(net.get()(x), reference(x))


def test_module_loader_reads_a_named_file_of_a_directory(cache: Cache, tmp_path: Path) -> None:
    reference = _reference(width=8, depth=2)
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(reference.state_dict(), str(repo / "model.safetensors"))
    (repo / "config.json").write_text("{}")
    loader = module_loader(lambda: Net(8, 2), filename="model.safetensors")
    net = _handle(repo, cache, loader=loader).get()
    x = torch.randn(2, 8)
    assert torch.equal(net(x), reference(x))


def test_a_parameter_missing_from_the_checkpoint_is_an_error() -> None:
    state = _reference(width=8, depth=2).state_dict()
    del state["layers.1.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.weight"):
        build_on_meta(lambda: Net(8, 2), state, strict=False)
    with pytest.raises(RuntimeError, match="Missing key"):
        build_on_meta(lambda: Net(8, 2), state)


def test_parameters_on_meta_leaves_other_threads_alone() -> None:
    built: dict[str, torch.nn.Linear] = {}

    def elsewhere() -> None:
        built["other"] = torch.nn.Linear(4, 4)

    with _parameters_on_meta():
        built["here"] = torch.nn.Linear(4, 4)
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    built["after"] = torch.nn.Linear(4, 4)
    assert built["here"].weight.is_meta
    assert not built["other"].weight.is_meta
    assert not built["after"].weight.is_meta


def test_unloading_a_mapped_module_frees_its_pages(cache: Cache, tmp_path: Path) -> None:
    width, depth = 1024, 8  # 32 MiB of weights
    with torch.device("meta"):
        shapes = Net(width, depth).state_dict()
    state = {k: torch.rand(v.shape) for k, v in shapes.items()}
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    del state

    def warmup(net: Net) -> None:  # touches every weight page before READY
        with torch.no_grad():
            net(torch.ones(2, width))

    h = _handle(path, cache, loader=module_loader(lambda: Net(width, depth)), warmup=warmup)
    h.get()
    assert mapped_ranges(path)
    Net.built.clear()  # the test's own references
    h.unload()
    assert h.status()["bytes_freed"] > 24 * MiB
    assert mapped_ranges(path) == []


# -- ONNX and sharded safetensors -------------------------------------------------------------


def _linear_arrays(rows: int = 16, cols: int = 4) -> tuple[Any, Any]:
    import numpy as np

    generator = np.random.default_rng(0)
    weight = generator.standard_normal((rows, cols)).astype(np.float32)
    return weight, generator.standard_normal(cols).astype(np.float32)


def test_an_onnx_file_loads_as_an_inference_session_on_cpu(
    model_server: ModelServer, cache: Cache, tmp_path: Path
) -> None:
    import numpy as np

    weight, bias = _linear_arrays()
    write_onnx_linear(tmp_path / "linear.onnx", weight, bias)
    url = model_server.add("linear.onnx", tmp_path / "linear.onnx")

    session = _handle(url, cache).get()

    assert type(session).__name__ == "InferenceSession"
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = np.ones((2, 16), dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight + bias, rtol=1e-5)


def test_an_onnx_model_with_external_data_loads_from_its_directory(
    hub: HubStandIn, cache: Cache, tmp_path: Path
) -> None:
    import numpy as np

    weight, bias = _linear_arrays(64, 8)
    write_onnx_linear(tmp_path / "model.onnx", weight, bias, external_data="model.onnx_data")
    assert (tmp_path / "model.onnx_data").stat().st_size >= weight.nbytes
    hub.push(
        "org/linear-onnx",
        {name: (tmp_path / name).read_bytes() for name in ("model.onnx", "model.onnx_data")}
        | {"README.md": b"# an ONNX model with its weights beside it\n"},
    )

    session = _handle("hf://org/linear-onnx", cache).get()

    x = np.arange(128, dtype=np.float32).reshape(2, 64) / 100
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight + bias, rtol=1e-5)


def test_onnx_without_onnxruntime_names_the_install_command(
    cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weight, bias = _linear_arrays()
    write_onnx_linear(tmp_path / "linear.onnx", weight, bias)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(LoadError, match=re.escape("pip install 'modelcache[onnx]'")):
        _handle(tmp_path / "linear.onnx", cache).get()


def _sharded_checkpoint() -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """A checkpoint in two shards with its index, a stray file the index does not name."""
    torch.manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(64, 64) for i in range(4)}
    shards = {
        "model-00001-of-00002.safetensors": ["layers.0.weight", "layers.1.weight"],
        "model-00002-of-00002.safetensors": ["layers.2.weight", "layers.3.weight"],
    }
    files = {name: save({key: tensors[key] for key in keys}) for name, keys in shards.items()}
    weight_map = {key: name for name, keys in shards.items() for key in keys}
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": 4 * 64 * 64 * 4}, "weight_map": weight_map}
    ).encode()
    files["model.fp16.safetensors"] = save({"stray": torch.zeros(2)})  # not in the index
    files["config.json"] = b'{"layers": 4}'
    return files, tensors


def test_a_sharded_checkpoint_loads_as_one_mapped_state_dict(hub: HubStandIn, cache: Cache) -> None:
    files, tensors = _sharded_checkpoint()
    hub.push("org/sharded", files)

    state = _handle("hf://org/sharded", cache).get()

    assert sorted(state) == sorted(tensors)  # the index's tensors; the stray file is not read
    assert all(torch.equal(state[k], tensors[k]) for k in tensors)
    folder = cache.fetch("hf://org/sharded")
    first = mapped_ranges(folder / "model-00001-of-00002.safetensors")
    second = mapped_ranges(folder / "model-00002-of-00002.safetensors")
    assert all(inside(state[f"layers.{i}.weight"].data_ptr(), first) for i in (0, 1))
    assert all(inside(state[f"layers.{i}.weight"].data_ptr(), second) for i in (2, 3))


def test_a_shard_missing_from_its_index_is_a_load_error(cache: Cache, tmp_path: Path) -> None:
    files, _ = _sharded_checkpoint()
    for name, data in files.items():
        if name != "model-00002-of-00002.safetensors":
            (tmp_path / name).write_bytes(data)
    missing = re.escape("model-00002-of-00002.safetensors, which is missing")
    with pytest.raises(LoadError, match=missing):
        _handle(tmp_path, cache).get()


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("https://models.example.com/model.safetensors", "torch"),
        ("s3://bucket/checkpoints/model.PT", "torch"),
        ("file:///srv/models/model.ckpt", "torch"),
        ("hf://org/repo/model.onnx", "onnxruntime"),
    ],
)
def test_the_default_loaders_imports_are_known_ahead_by_the_sources_suffix(
    source: str, module: str
) -> None:
    prepare = preparation(None, source)
    assert prepare is not None
    assert prepare() is sys.modules[module]


def test_nothing_is_imported_ahead_for_a_directory_or_a_loader_of_yours() -> None:
    assert preparation(None, "hf://org/repo") is None  # its files decide, not known yet
    assert preparation(lambda path: path, "https://models.example.com/model.safetensors") is None


def test_the_loaders_of_modelcache_import_their_libraries_ahead() -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    named = preparation(from_pretrained("transformers.AutoModel"), "hf://org/repo")
    assert named is not None
    assert named() is AutoModel
    assert preparation(from_pretrained(AutoModel), "hf://org/repo") is None  # imported already
    sentences = preparation(sentence_transformer(), "hf://org/repo")
    assert sentences is not None
    assert sentences() is SentenceTransformer
    module = preparation(module_loader(Net), "https://models.example.com/net.safetensors")
    assert module is not None
    assert module() is torch
