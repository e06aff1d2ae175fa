"""The public names, pinned (like httpx's test_exported_members), and a light import."""

from __future__ import annotations

import json
import subprocess
import sys

import modelcache

EXPECTED = [
    "Cache",
    "Entry",
    "InsufficientSpaceError",
    "IntegrityError",
    "LoadError",
    "LockTimeoutError",
    "ModelCacheError",
    "ModelHandle",
    "NotCachedError",
    "NotReadyError",
    "Registry",
    "SourceError",
    "State",
    "Strategy",
    "TransferOptions",
    "__version__",
]


def test_all_is_pinned_and_sorted() -> None:
    assert modelcache.__all__ == EXPECTED
    assert sorted(modelcache.__all__) == modelcache.__all__


def test_every_exported_name_exists_and_is_documented() -> None:
    for name in modelcache.__all__:
        value = getattr(modelcache, name)
        if name != "__version__":
            assert value.__doc__, name
    assert isinstance(modelcache.__version__, str)


def test_import_and_cache_construction_stay_light() -> None:
    heavy = [
        "torch",
        "s3fs",
        "gcsfs",
        "huggingface_hub",
        "fastapi",
        "flask",
        "aiohttp",
        "safetensors",
        "tqdm",
        "urllib3",
    ]
    code = (
        "import json, sys\n"
        "import modelcache\n"
        "cache = modelcache.Cache('/nonexistent-modelcache-home')\n"
        "cache.path, cache.read_only_paths, cache.offline\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == []
