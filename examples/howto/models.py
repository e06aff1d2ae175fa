"""The models of an app, in one importable module (``models:registry``).

The web app imports it at run time; ``modelcache fetch --registry models:registry`` imports it
to pre-load a volume or an image. Both build the same sources, so both find the same entries.
Importing it loads nothing.
"""

from __future__ import annotations

import os

from modelcache import ModelHandle, Registry

#: Your CDN, bucket or mirror; the test suite points it at a server on 127.0.0.1.
ORIGIN = os.environ.get("MODEL_ORIGIN", "https://models.example.com/v1").rstrip("/")

registry = Registry(
    [
        ModelHandle("generator", source=f"{ORIGIN}/generator.safetensors", strategy="eager"),
        ModelHandle("lora", source=f"{ORIGIN}/lora.safetensors", strategy="eager"),
    ]
)

if __name__ == "__main__":
    registry.start()  # eager: fetch (or find) and load every model now
    for name, status in registry.status()["models"].items():
        print(f"{name}: {status['state']}, cache hit: {status['cache_hit']}")
