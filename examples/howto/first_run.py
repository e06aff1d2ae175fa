"""Download on first run (seed 000, option 1): fetched once from the CDN, then from the cache.

    python examples/howto/first_run.py

The first start downloads the checkpoint (resumable, retried, sha256-verified) into the cache
(``MODELCACHE_HOME``, else your user cache directory); every later start finds it there and
touches no network. ``SHARP_URL`` points it at another copy of the file.
"""

from __future__ import annotations

import os

from modelcache import ModelHandle

SHARP_URL = os.environ.get(
    "SHARP_URL", "https://ml-site.cdn-apple.com/models/sharp/sharp_2572gikvuh.pt"
)

sharp = ModelHandle(
    "sharp",
    source=SHARP_URL,
    strategy="background",  # start() returns at once; the download runs beside the server
)

if __name__ == "__main__":
    sharp.start()
    state_dict = sharp.get(timeout=900)  # waits for the background fetch and load
    status = sharp.status()
    print(f"{len(state_dict)} tensors; cache hit: {status['cache_hit']}; {status['timings']}")
