"""The public names, pinned (like httpx's test_exported_members), and a light import."""

from __future__ import annotations

import enum
import inspect
import json
import pkgutil
import subprocess
import sys
from types import ModuleType

import pytest

import modelcache
import modelcache.handle

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


HANDLE = ["HandleStatus", "ModelHandle", "ReloadStatus", "State", "Strategy", "Timings"]


def exposed(package: ModuleType) -> list[str]:
    """The names ``package`` really exposes: public, and not a submodule."""
    return sorted(
        name
        for name, value in vars(package).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    )


def test_all_is_pinned_and_sorted() -> None:
    assert modelcache.__all__ == EXPECTED
    assert sorted(modelcache.__all__) == modelcache.__all__
    assert modelcache.handle.__all__ == HANDLE


@pytest.mark.parametrize("package", [modelcache, modelcache.handle], ids=lambda p: p.__name__)
def test_all_is_what_the_package_really_exposes(package: ModuleType) -> None:
    """Nothing leaks (``from __future__ import annotations`` binds ``annotations``; an import
    used only inside ``__init__`` binds its name) and nothing in ``__all__`` is missing."""
    public = [name for name in package.__all__ if not name.startswith("_")]
    assert exposed(package) == public


def test_the_handle_packages_modules_are_private() -> None:
    modules = [m.name for m in pkgutil.iter_modules(modelcache.handle.__path__)]
    assert "_pipeline" in modules
    assert all(name.startswith("_") for name in modules), modules


@pytest.mark.parametrize("package", [modelcache, modelcache.handle], ids=lambda p: p.__name__)
def test_every_exported_name_and_its_public_members_are_documented(package: ModuleType) -> None:
    for name in package.__all__:
        value = getattr(package, name)
        if name == "__version__":
            assert isinstance(value, str)
            continue
        assert value.__doc__, name
        if not inspect.isclass(value):
            continue
        for attribute, member in vars(value).items():
            if attribute.startswith("_") or (
                isinstance(value, enum.EnumMeta) and attribute in value.__members__
            ):
                continue
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if callable(member) or isinstance(member, property):
                assert member.__doc__, f"{name}.{attribute}"


def test_import_and_construction_stay_light() -> None:
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
        "numpy",
        "torchao",
        "whisper",
        "sharp",
        "asyncio",  # 15 ms each: only a coroutine caller (which has them already) needs them
        "email.utils",
    ]
    code = (
        "import json, sys\n"
        "import modelcache\n"
        "cache = modelcache.Cache('/nonexistent-modelcache-home')\n"
        "cache.path, cache.read_only_paths, cache.offline\n"
        "from modelcache import recipes\n"  # the handle package and the recipes too
        "handle = modelcache.ModelHandle('m', source='https://h/m.pt', cache=cache,\n"
        "                                quantize='int8', strategy='background')\n"
        "models = modelcache.Registry([handle, recipes.sharp(cache=cache)])\n"
        "models.status(), models.ready, repr(handle)\n"
        f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(done.stdout) == []
