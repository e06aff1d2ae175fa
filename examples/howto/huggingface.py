"""The Hugging Face Hub (seed 000 option 5, seed 001): one file, or a whole repo, from ``hf://``.

    python examples/howto/huggingface.py

Private or gated repos: set ``HF_TOKEN`` (or ``storage_options={"hf": {"token": ...}}``); it
never appears in logs, errors or ``status()``. ``HF_ENDPOINT`` points at a Hub mirror.
"""

from __future__ import annotations

import os

from modelcache import ModelHandle, Registry
from modelcache.loaders import sentence_transformer

# Pin a commit hash in production: a warm start then needs no network at all. A branch
# ("main") or a tag is resolved once, when the entry is made, and recorded.
REVISION = os.environ.get("MINILM_REVISION", "main")

# One file of a repo (what hf_hub_download(repo_id, filename) gives), loaded as a state dict.
minilm = ModelHandle(
    "minilm",
    source=f"hf://sentence-transformers/all-MiniLM-L6-v2@{REVISION}/model.safetensors",
)

# A whole repo, only the files you need (seed 001's `huggingface-cli download --local-dir`):
# one cache entry, every file verified, published as a whole. The loader gets the directory:
# here sentence-transformers' model (imported when it loads; weights memory-mapped).
minilm_repo = ModelHandle(
    "minilm-repo",
    source=f"hf://sentence-transformers/all-MiniLM-L6-v2@{REVISION}"
    "?include=*.json,*.safetensors,*.txt",
    loader=sentence_transformer(device="cpu"),
)

models = Registry([minilm, minilm_repo])

if __name__ == "__main__":
    models.start()
    print(f"minilm: {len(minilm.get())} tensors")
    folder = minilm_repo.fetch()
    print(f"minilm-repo files: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    embeddings = minilm_repo.get().encode(["modelcache fetches weights once."])
    print(f"minilm-repo: {embeddings.shape[1]}-dimensional embeddings")
