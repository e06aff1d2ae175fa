"""A bucket mirror in front of a CDN (seed 000, option 4): your bucket first, the CDN if it fails.

    modelcache mirror "$SHARP_URL" "$SHARP_MIRROR"    # once: copy the file into your bucket
    python examples/howto/cdn_mirror.py

s3fs finds the bucket's credentials and endpoint the usual way (``AWS_*`` variables, a profile,
the instance's role); ``storage_options={"s3": {...}}`` passes them explicitly instead.
"""

from __future__ import annotations

import os

from modelcache import ModelHandle

SHARP_URL = os.environ.get(
    "SHARP_URL", "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt"
)
SHARP_MIRROR = os.environ.get("SHARP_MIRROR", "s3://my-models/sharp/sharp_2572gikvuh.pt")
SHARP_SHA256 = os.environ.get("SHARP_SHA256")  # printed by `modelcache mirror`: pin it here

sharp = ModelHandle(
    "sharp",
    source=[SHARP_MIRROR, SHARP_URL],  # tried in order; the first that answers wins
    sha256=SHARP_SHA256,  # one cache entry, whichever copy served it; verified either way
    strategy="background",
)

if __name__ == "__main__":
    sharp.start()
    state_dict = sharp.get(timeout=900)
    print(f"{len(state_dict)} tensors from {sharp.status()['source']}")
