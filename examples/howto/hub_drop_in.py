"""Coming from huggingface_hub: the same calls, one import changed.

    python examples/howto/hub_drop_in.py

``HF_ENDPOINT`` (a Hub mirror such as olah), ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what
they mean for huggingface_hub. The files land in modelcache's cache (``MODELCACHE_HOME``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

# before: from huggingface_hub import hf_hub_download, snapshot_download
from modelcache.compat import hf_hub_download, snapshot_download

REPO = "sentence-transformers/all-MiniLM-L6-v2"

# A str path to a folder laid out like the repo (the files the patterns choose).
folder = snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors", "*.txt"])
# A str path to one file.
pooling = hf_hub_download(REPO, "config.json", subfolder="1_Pooling")

tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModel.from_pretrained(folder)
batch = tokenizer(["modelcache fetches weights once."], return_tensors="pt")
with torch.inference_mode():
    embedding = model(**batch).last_hidden_state.mean(dim=1)
print(f"{REPO}: {embedding.shape[1]}-dimensional embedding")
print(f"pooling config: {Path(pooling).read_text().strip()[:40]}...")
