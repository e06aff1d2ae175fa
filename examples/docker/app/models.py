"""The models this service serves.

Imported by the web app at run time and by ``modelcache fetch --registry app.models:registry``
at build time: both build the same sources, so the build's cache entries are the ones the app
finds. Importing this module loads nothing (the handles are lazy until the app starts them).
"""

from __future__ import annotations

import os

from modelcache import ModelHandle, Registry

#: Where the weights come from: your CDN, bucket or mirror (a build argument of the image).
ORIGIN = os.environ.get("MODEL_ORIGIN", "https://models.example.com/v1").rstrip("/")

registry = Registry(
    [
        # Needed to answer requests: loaded at start-up, before /ready says yes.
        ModelHandle("classifier", source=f"{ORIGIN}/classifier.safetensors", strategy="eager"),
        # Loaded in the background; the service starts without waiting for it.
        ModelHandle(
            "embedder",
            source=f"{ORIGIN}/embedder.safetensors",
            strategy="background",
            required=False,
        ),
    ]
)
