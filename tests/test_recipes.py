"""Recipes: Whisper and Sharp handles, loaded from fakes of the real formats on a local server."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from modelcache import IntegrityError, LoadError, ModelHandle, recipes
from modelcache.testing import ModelServer
from modelcache.testing.fake_weights import WHISPER_TEST_DIMS, sharp_manifest

FakeWeights = Callable[..., Path]

SIZES = [
    "tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
    "large-v1", "large-v2", "large-v3", "large", "large-v3-turbo", "turbo",
]  # fmt: skip


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve(server: ModelServer, path: Path, name: str | None = None) -> tuple[str, str]:
    """Serve ``path``; its URL and sha256."""
    return server.add(name or path.name, path), sha_of(path)


# -- the tables -----------------------------------------------------------------------------------


def test_every_whisper_size_has_openais_url_and_sha256() -> None:
    import whisper

    assert sorted(recipes.WHISPER_MODELS) == sorted(SIZES)
    assert dict(recipes.WHISPER_MODELS) == whisper._MODELS
    for size in SIZES:
        handle = recipes.whisper(size)
        assert handle.name == f"whisper-{size}"
        assert handle.source == whisper._MODELS[size]
        assert handle.sha256 == whisper._MODELS[size].split("/")[-2] == recipes.whisper_sha256(size)
    assert recipes.whisper("large").sha256 == recipes.whisper("large-v3").sha256
    assert recipes.whisper("turbo").source == recipes.whisper_url("large-v3-turbo")


def test_unknown_size_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown whisper size 'huge'.*tiny\.en"):
        recipes.whisper("huge")


def test_sharp_points_at_apples_url_without_a_sha256() -> None:
    handle = recipes.sharp()
    assert handle.name == "sharp"
    assert handle.source == "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt"
    assert handle.sha256 is None
    assert "non-commercial" in (recipes.sharp.__doc__ or "")
    pinned = recipes.sharp(name="sharp-pinned", sha256="ab" * 32, strategy="eager")
    assert (pinned.name, pinned.sha256, pinned.strategy.value) == (
        "sharp-pinned",
        "ab" * 32,
        "eager",
    )


def test_making_recipe_handles_imports_nothing_heavy() -> None:
    code = textwrap.dedent("""
        import sys
        from modelcache import recipes
        recipes.whisper("large-v3", strategy="background", quantize="int8")
        recipes.sharp()
        heavy = [m for m in ("torch", "whisper", "numpy", "sharp") if m in sys.modules]
        print(heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- whisper --------------------------------------------------------------------------------------


def test_whisper_recipe_loads_a_ready_model_from_a_mirror(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    import whisper
    from whisper.model import Whisper

    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url, digest = serve(model_server, path, "mirror/tiny.pt")
    handle = recipes.whisper("tiny", source=url, sha256=digest)
    model = handle.get()

    assert isinstance(model, Whisper)
    assert not model.training
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # as whisper.load_model
    reference = whisper.load_model(str(path), device="cpu")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(model.decoder.mask, reference.decoder.mask)

    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([[50258, 50259, 50359]])
    with torch.no_grad():
        logits = model(mel, tokens)
        expected = reference(mel, tokens)
    assert logits.shape == (1, 3, WHISPER_TEST_DIMS["n_vocab"])
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, expected)

    status = handle.status()
    assert (status["state"], status["cache_hit"], status["error"]) == ("ready", False, None)
    assert status["bytes_total"] == path.stat().st_size


def test_second_start_is_served_from_the_cache(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url, digest = serve(model_server, path, "tiny.pt")
    recipes.whisper("tiny", source=url, sha256=digest).get()
    requests = model_server.count("tiny.pt")[0]
    model_server.remove("tiny.pt")  # the origin is gone: a warm start must not need it

    again = recipes.whisper("tiny", source=url, sha256=digest)
    model = again.get()
    assert again.status()["cache_hit"] is True
    assert model_server.count("tiny.pt")[0] == requests
    assert model.dims.n_text_state == WHISPER_TEST_DIMS["n_text_state"]


def test_official_alignment_heads_are_set_when_they_fit(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    import whisper

    tiny_decoder = {**WHISPER_TEST_DIMS, "n_text_state": 96, "n_text_head": 6, "n_text_layer": 4}
    tiny = fake_weights("whisper", **tiny_decoder)  # tiny's 4 x 6 decoder heads
    url, digest = serve(model_server, tiny)
    model = recipes.whisper("tiny", source=url, sha256=digest).get()
    expected = whisper.load_model(str(tiny), device="cpu")
    expected.set_alignment_heads(whisper._ALIGNMENT_HEADS["tiny"])
    assert torch.equal(model.alignment_heads.to_dense(), expected.alignment_heads.to_dense())
    assert model.alignment_heads.is_sparse

    small = fake_weights("whisper", **WHISPER_TEST_DIMS)  # tiny's heads do not fit: defaults
    url, digest = serve(model_server, small, "small-dims.pt")
    model = recipes.whisper("tiny", name="small-dims", source=url, sha256=digest).get()
    heads = model.alignment_heads.to_dense()
    assert heads.shape == (2, 2)
    assert heads.tolist() == [[False, False], [True, True]]  # Whisper's default: last half


def test_mirror_with_other_bytes_fails_the_official_sha256(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url, _ = serve(model_server, path, "tiny.pt")
    handle = recipes.whisper("tiny", source=url)  # keeps the official sha256
    with pytest.raises(IntegrityError) as caught:
        handle.get()
    assert "whisper-tiny" in str(caught.value)
    assert url in str(caught.value)
    assert not [p for p in modelcache_home.iterdir() if not p.name.startswith(".")]


def test_whisper_falls_back_to_the_checkpoint_without_openai_whisper(
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in [m for m in sys.modules if m == "whisper" or m.startswith("whisper.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "whisper", None)  # `import whisper` now fails
    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url, digest = serve(model_server, path)
    checkpoint = recipes.whisper("base", source=url, sha256=digest).get()
    assert set(checkpoint) == {"dims", "model_state_dict"}
    assert checkpoint["dims"] == dict(WHISPER_TEST_DIMS)
    assert len(checkpoint["model_state_dict"]) == 89  # 37 encoder + 52 decoder tensors
    assert checkpoint["model_state_dict"]["decoder.ln.weight"].dtype == torch.float16


def test_a_user_loader_replaces_the_recipes(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url, digest = serve(model_server, path)
    handle = recipes.whisper("tiny", source=url, sha256=digest, loader=lambda p: p.name)
    assert handle.get() == path.name


# -- sharp ----------------------------------------------------------------------------------------


@pytest.fixture
def no_sharp_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Forget any imported ``sharp`` modules before and after the test."""

    def forget() -> None:
        for module in [m for m in sys.modules if m == "sharp" or m.startswith("sharp.")]:
            del sys.modules[module]

    forget()
    yield
    forget()


def test_sharp_recipe_returns_the_state_dict_without_ml_sharp(
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    no_sharp_package: None,
) -> None:
    path = fake_weights("sharp")
    url, _ = serve(model_server, path)
    handle = recipes.sharp(source=url)
    state = handle.get()
    assert list(state) == list(sharp_manifest())
    original = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert handle.status()["sha256"] == sha_of(path)  # computed while downloading


def test_sharp_predictor_true_needs_ml_sharp(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path,
    no_sharp_package: None,
) -> None:  # fmt: skip
    url, _ = serve(model_server, fake_weights("sharp"))
    handle = recipes.sharp(source=url, loader=recipes.sharp_loader(predictor=True))
    with pytest.raises(LoadError, match="ml-sharp") as caught:
        handle.get()
    assert "'sharp'" in str(caught.value)


def test_an_unrelated_sharp_package_is_not_ml_sharp(
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_sharp_package: None,
) -> None:
    (tmp_path / "sharp").mkdir()  # like PyPI's "sharp" (a libsharp wrapper): no sharp.models
    (tmp_path / "sharp" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    url, _ = serve(model_server, fake_weights("sharp"))
    assert isinstance(recipes.sharp(source=url).get(), dict)


STAND_IN = '''
"""A stand-in for apple/ml-sharp's sharp.models (not on PyPI): same entry points, a module
whose parameters have the (capped) names and shapes of the real predictor."""
import json
import torch
from torch import nn


class PredictorParams:
    def __init__(self):
        self.shapes = json.loads(SHAPES)


class Predictor(nn.Module):
    def __init__(self, params):
        super().__init__()
        for key, shape in params.shapes.items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(torch.empty(shape)))
            nn.init.normal_(getattr(owner, leaf))
        # like a normalisation constant: not in the checkpoint
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]), persistent=False)


def create_predictor(params):
    return Predictor(params)
'''


def test_sharp_fills_ml_sharps_predictor_when_importable(
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_sharp_package: None,
) -> None:
    import json

    path = fake_weights("sharp")
    original = torch.load(path, weights_only=True)
    shapes = {key: list(t.shape) for key, t in original.items()}
    models = tmp_path / "sharp" / "models"
    models.mkdir(parents=True)
    (tmp_path / "sharp" / "__init__.py").write_text("")
    (models / "__init__.py").write_text(f"SHAPES = {json.dumps(json.dumps(shapes))}\n{STAND_IN}")
    monkeypatch.syspath_prepend(str(tmp_path))

    url, _ = serve(model_server, path)
    predictor = recipes.sharp(source=url).get()
    assert isinstance(predictor, torch.nn.Module)
    assert type(predictor).__module__ == "sharp.models"
    assert not predictor.training
    state = predictor.state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert torch.equal(predictor.mean, torch.tensor([0.485, 0.456, 0.406]))
    assert not any(t.is_meta for t in [*predictor.parameters(), *predictor.buffers()])

    as_dict = recipes.sharp(
        name="sharp-dict", source=url, loader=recipes.sharp_loader(predictor=False)
    )
    assert isinstance(as_dict.get(), dict)


def install_stand_in(
    root: Path, monkeypatch: pytest.MonkeyPatch, shapes: dict[str, list[int]] | None = None,
    init: str | None = None,
) -> None:  # fmt: skip
    """Put a ``sharp.models`` on ``sys.path``: the STAND_IN predictor of ``shapes``, or a
    package whose ``__init__`` is ``init`` (one that fails to import, like ml-sharp does when
    its dependencies are broken)."""
    import json

    models = root / "sharp" / "models"
    models.mkdir(parents=True)
    (root / "sharp" / "__init__.py").write_text("")
    body = init if init is not None else f"SHAPES = {json.dumps(json.dumps(shapes))}\n{STAND_IN}"
    (models / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(root))


def checkpoint_shapes(path: Path, grow: int = 0) -> dict[str, list[int]]:
    state = torch.load(path, weights_only=True)
    return {key: [n + grow for n in t.shape] for key, t in state.items()}


def test_sharp_falls_back_to_the_state_dict_when_building_the_predictor_fails(
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_sharp_package: None,
) -> None:
    path = fake_weights("sharp")
    install_stand_in(tmp_path, monkeypatch, checkpoint_shapes(path))
    import sharp.models  # the stand-in

    def broken_builder(params: object) -> object:  # what a CPU torch beside PyPI's CUDA
        raise RuntimeError("operator torchvision::nms does not exist")  # torchvision raises

    monkeypatch.setattr(sharp.models, "create_predictor", broken_builder)
    url, _ = serve(model_server, path)
    caplog.set_level(logging.WARNING, logger="modelcache")
    state = recipes.sharp(source=url).get()

    original = torch.load(path, weights_only=True)
    assert isinstance(state, dict)
    assert list(state) == list(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "could not be built (RuntimeError: operator torchvision::nms does not exist)" in (
        warning.getMessage()
    )
    assert "loading the state dict instead" in warning.getMessage()

    required = recipes.sharp(
        name="sharp-required", source=url, loader=recipes.sharp_loader(predictor=True)
    )
    with pytest.raises(LoadError, match=r"predictor could not be built.*torchvision::nms") as info:
        required.get()
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    ("init", "why"),
    [
        ('raise RuntimeError("operator torchvision::nms does not exist")\n', "torchvision::nms"),
        ("import timm_that_is_not_installed\n", "No module named 'timm_that_is_not_installed'"),
        ("", "cannot import name 'PredictorParams'"),
    ],
    ids=["runtime-error", "missing-dependency", "other-version"],
)
def test_sharp_falls_back_when_ml_sharp_is_installed_but_does_not_import(
    init: str,
    why: str,
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_sharp_package: None,
) -> None:
    install_stand_in(tmp_path, monkeypatch, init=init)
    url, _ = serve(model_server, fake_weights("sharp"))
    caplog.set_level(logging.WARNING, logger="modelcache")
    assert len(recipes.sharp(source=url).get()) == 1038
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "predictor cannot be imported" in warning.getMessage()
    assert why in warning.getMessage()


def test_a_checkpoint_that_does_not_fit_the_predictor_is_an_error_shown_cut_short(
    fake_weights: FakeWeights,
    model_server: ModelServer,
    modelcache_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_sharp_package: None,
) -> None:
    """Another ml-sharp version than the checkpoint's: every one of the 1038 tensors has
    another shape, and torch's message names them all (214 KB, as on the real model)."""
    path = fake_weights("sharp")
    install_stand_in(tmp_path, monkeypatch, checkpoint_shapes(path, grow=1))
    url, _ = serve(model_server, path)
    handle = recipes.sharp(source=url)
    caplog.set_level(logging.INFO, logger="modelcache")
    with pytest.raises(LoadError) as info:
        handle.get()

    full = str(info.value)  # the exception keeps every word
    assert len(full) > 200_000
    assert full.count("size mismatch for ") == 1038
    assert "feature_model.decoder.convs.0.weight" in full
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) in full

    status = handle.status()
    shown = status["error"]
    assert shown is not None
    text = f"LoadError: {full}"
    assert shown == f"{text[:2000]}... ({len(text) - 2000} more characters)"
    assert len(json.dumps(status)) < 4000  # a /ready body, not 214 KB
    (failed,) = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) < 2100
    assert failed.endswith(f"({len(full) - 2000} more characters)")
    assert "size mismatch for feature_model.decoder.convs.0.weight" in failed


def test_recipe_handles_are_model_handles() -> None:
    assert isinstance(recipes.whisper("tiny"), ModelHandle)
    assert isinstance(recipes.sharp(), ModelHandle)


def test_adopt_builds_normally_when_a_buffer_stays_on_meta() -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)
            self.register_buffer("scale", torch.empty(3).fill_(2.0), persistent=False)

    state = {"linear.weight": torch.ones(3, 4), "linear.bias": torch.zeros(3)}
    net = recipes.adopt(Net, state)
    assert torch.equal(net.scale, torch.full((3,), 2.0))
    assert torch.equal(net.linear.weight, torch.ones(3, 4))

    fixed = recipes.adopt(Net, state, fix=lambda m: m.register_buffer("scale", torch.ones(3)))
    assert torch.equal(fixed.scale, torch.ones(3))  # fixed on meta: adopted, not rebuilt
    assert fixed.linear.weight.data_ptr() == state["linear.weight"].data_ptr()
    with pytest.raises(RuntimeError, match="Missing key"):
        recipes.adopt(Net, {"linear.weight": torch.ones(3, 4)})


# -- docs/recipes.md -----------------------------------------------------------------------------


def test_docs_python_examples_print_what_they_say(capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import code_blocks

    blocks = [b for b in code_blocks("recipes.md", "python") if "def test_" not in b]
    assert len(blocks) == 3
    namespace: dict[str, object] = {}
    for n, block in enumerate(blocks):
        exec(compile(block, f"docs/recipes.md[python {n}]", "exec"), namespace)
        expected = [line.split("# ", 1)[1] for line in block.splitlines() if "print(" in line]
        assert capsys.readouterr().out.splitlines() == expected
    mirrored = namespace["mirrored"]
    assert isinstance(mirrored, ModelHandle)
    assert [s.protocol for s in mirrored.sources] == ["s3", "https"]
    assert mirrored.sha256 == recipes.whisper_sha256("large-v3")


def test_docs_testing_example_passes_under_pytest(tmp_path: Path) -> None:
    from conftest import code_blocks

    (example,) = [b for b in code_blocks("recipes.md", "python") if "def test_" in b]
    (tmp_path / "test_docs_example.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 passed" in done.stdout


def test_whisper_recipe_with_int8(
    fake_weights: FakeWeights, model_server: ModelServer, modelcache_home: Path
) -> None:
    path = fake_weights("whisper", **WHISPER_TEST_DIMS)
    url, digest = serve(model_server, path)
    handle = recipes.whisper("tiny", source=url, sha256=digest, quantize="int8")
    model = handle.get()  # Whisper's layers subclass nn.Linear; its sparse buffer is skipped
    assert handle.status()["quantization"]
    with torch.no_grad():
        logits = model(torch.randn(1, 80, 3000), torch.tensor([[50258, 50259]]))
    assert logits.shape == (1, 2, WHISPER_TEST_DIMS["n_vocab"])
    assert torch.isfinite(logits).all()
