"""Smoke test of the built wheel, as a user's project sees it (``nox -s wheel`` runs it).

It runs in a clean venv holding only the wheel with its ``[testing]`` extra (and the pinned CPU
torch), from a temporary folder, so nothing of the source tree is importable: a module, a data
file or an entry point missing from the wheel fails here. The fixtures come from the installed
pytest plugin (entry point ``pytest11``), as in a user's project: there is no conftest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

import modelcache
from modelcache import ModelHandle
from modelcache.testing import FAKE_KINDS, ModelServer
from modelcache.testing.fake_weights import WHISPER_TEST_DIMS

BIN = Path(sys.executable).parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done


def test_modelcache_comes_from_the_wheel_not_the_source_tree() -> None:
    installed = Path(modelcache.__file__).resolve().parent
    assert installed.parent == Path(sysconfig.get_paths()["purelib"]).resolve()  # not editable
    source = Path(os.environ["MODELCACHE_SOURCE_TREE"]).resolve()
    on_path = {Path(entry or ".").resolve() for entry in sys.path}
    assert not on_path & {source, source / "src"}
    assert (installed / "py.typed").is_file()


def test_a_handle_over_the_model_server_fixture(
    model_server: ModelServer, fake_weights: Callable[..., Path], modelcache_home: Path
) -> None:
    path = fake_weights("safetensors", size_bytes=256 << 10)  # safetensors' save_file: numpy
    url = model_server.add("model.safetensors", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    handle = ModelHandle("smoke", source=url, sha256=digest)
    weights = handle.get()

    assert sorted(weights) == ["layers.0.bias", "layers.0.weight"]
    assert handle.status()["state"] == "ready"
    assert modelcache_home in Path(handle.status()["path"]).parents
    assert model_server.requests["/model.safetensors"] >= 1
    assert ModelHandle("again", source=url, sha256=digest).get().keys() == weights.keys()


@pytest.mark.parametrize("kind", FAKE_KINDS)
def test_every_fake_weights_kind_writes(fake_weights: Callable[..., Path], kind: str) -> None:
    options = WHISPER_TEST_DIMS if kind == "whisper" else {}  # sharp reads its packaged manifest
    assert fake_weights(kind, size_bytes=64 << 10, **options).stat().st_size > 0


def test_the_command_line_and_the_demo_answer_help() -> None:
    assert "fetch" in run(str(BIN / "modelcache"), "--help").stdout  # the console script
    assert "fetch" in run(sys.executable, "-m", "modelcache", "--help").stdout
    assert "--quantize" in run(sys.executable, "-m", "modelcache.demo", "--help").stdout


def test_the_demo_and_the_library_need_no_pytest() -> None:
    # pytest made unimportable: the demo's modules and --help, the CLI and the FastAPI routes
    no_pytest = (
        "import runpy, sys; sys.modules['pytest'] = None\n"
        "import modelcache.cli, modelcache.demo.app, modelcache.integrations.fastapi\n"
        "sys.argv[0] = 'modelcache.demo'\n"
        "runpy.run_module('modelcache.demo', run_name='__main__', alter_sys=True)\n"
    )
    assert "--quantize" in run(sys.executable, "-c", no_pytest, "--help").stdout
