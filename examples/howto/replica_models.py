"""The models of a service that runs many replicas (``replica_models:registry``).

Every node reads the weights from the nearest copy: an object-store mirror in its region first,
the origin only if the mirror fails. The node's cache (``MODELCACHE_HOME``, a hostPath shared by
the pods of the node) holds one copy per node; a cache baked into the image
(``MODELCACHE_READ_ONLY_PATHS``) is searched before both.
"""

from __future__ import annotations

import os

from modelcache import ModelHandle, Registry

MIRROR = os.environ.get("MODEL_MIRROR", "s3://models-eu-west-1/v1").rstrip("/")
ORIGIN = os.environ.get("MODEL_ORIGIN", "https://models.example.com/v1").rstrip("/")


def sources(name: str) -> list[str]:
    """The regional mirror first, then the origin."""
    return [f"{MIRROR}/{name}", f"{ORIGIN}/{name}"]


registry = Registry(
    [
        ModelHandle("generator", source=sources("generator.safetensors"), strategy="background"),
    ]
)

if __name__ == "__main__":
    registry.start()
    registry["generator"].get(timeout=900)
    print("READY", registry.status()["models"]["generator"]["cache_hit"])
