"""examples/docker: the Dockerfile's own commands, run here (no Docker engine needed).

The test reads the Dockerfile, keeps the build's ARG/ENV values, and runs every ``RUN`` line that
calls ``modelcache`` in a copy of the build context, with the image's absolute paths moved under
a temporary directory and ``MODEL_ORIGIN`` pointed at ``model_server`` (as
``docker build --build-arg MODEL_ORIGIN=...`` would). Then it takes the run-time ENV and the
``CMD``, stops serving the weights, and runs the CMD for real: its start-up check, then uvicorn
serving the app from the pre-loaded cache, with no network and without writing the image's
layer.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from modelcache.testing import ModelServer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "docker"
MODELS = ("classifier", "embedder")


@dataclass
class Dockerfile:
    """What the test needs from a Dockerfile: build steps with their env, the final env, CMD."""

    runs: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, build_args: dict[str, str]) -> Dockerfile:
        parsed = cls()
        joined = re.sub(
            r"\\\n",
            " ",
            "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
        )
        for line in joined.splitlines():
            if not line.strip():
                continue
            instruction, _, rest = line.strip().partition(" ")
            rest = rest.strip()
            instruction = instruction.upper()
            if instruction == "ARG":
                name, _, default = rest.partition("=")
                parsed.env[name] = build_args.get(name, default)
            elif instruction == "ENV":
                for pair in shlex.split(rest):
                    name, _, value = pair.partition("=")
                    parsed.env[name] = _expand(value, parsed.env)
            elif instruction == "RUN":
                parsed.runs.append((rest, dict(parsed.env)))
            elif instruction == "CMD":
                parsed.cmd = json.loads(rest)
            elif instruction == "VOLUME":
                parsed.volumes += json.loads(rest) if rest.startswith("[") else rest.split()
        return parsed


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


class Image:
    """The image's filesystem, rebased under a temporary directory."""

    def __init__(self, root: Path, context: Path) -> None:
        self.root = root
        self.context = context  # the WORKDIR: COPY . puts the context there

    def path(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def rebase_env(self, env: dict[str, str]) -> dict[str, str]:
        """MODELCACHE_* paths moved under the image root."""
        rebased = dict(env)
        for name, value in env.items():
            if name in ("MODELCACHE_HOME", "MODELCACHE_READ_ONLY_PATHS"):
                rebased[name] = os.pathsep.join(
                    str(self.path(part)) for part in value.split(os.pathsep) if part
                )
        return rebased

    def rebase_command(self, command: str) -> str:
        """``--cache /abs/path`` moved under the image root."""
        return re.sub(r"--cache[ =](/\S+)", lambda m: f"--cache {self.path(m[1])}", command)

    def sh(self, command: str, env: dict[str, str], **kwargs: Any) -> Any:
        """Run a shell command as the Dockerfile would, with ``modelcache`` on PATH."""
        bin_dir = str(Path(sys.executable).parent)
        full_env = {
            **os.environ,
            **self.rebase_env(env),
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        }
        return subprocess.Popen(
            ["sh", "-c", self.rebase_command(command)],
            cwd=self.context,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )


@pytest.fixture
def origin(model_server: ModelServer, fake_weights: Callable[..., Path]) -> str:
    """The weights the app lists, served under ``<model_server>/v1/``."""
    for i, name in enumerate(MODELS):
        model_server.add(f"v1/{name}.safetensors", fake_weights("safetensors", (i + 1) << 18))
    return f"{model_server.url}/v1"


@pytest.fixture
def image(tmp_path: Path) -> Image:
    context = tmp_path / "image" / "srv"
    shutil.copytree(EXAMPLE, context, ignore=shutil.ignore_patterns("__pycache__"))
    return Image(tmp_path / "image", context)


def _build(image: Image, dockerfile: Dockerfile) -> list[str]:
    """Run the RUN steps that call modelcache; their outputs."""
    outputs = []
    steps = [(cmd, env) for cmd, env in dockerfile.runs if "modelcache" in cmd]
    assert steps, "the Dockerfile pre-loads nothing with modelcache"
    for command, env in steps:
        proc = image.sh(command, env)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, f"RUN {command}\n{out}\n{err}"
        outputs.append(out)
    return outputs


def _start_command(dockerfile: Dockerfile, port: int) -> str:
    assert dockerfile.cmd[:2] == ["sh", "-c"], dockerfile.cmd
    return dockerfile.cmd[2].replace("0.0.0.0", "127.0.0.1").replace("8000", str(port))


def test_the_dockerfile_preloads_at_build_and_serves_offline_from_the_image(
    image: Image, origin: str, model_server: ModelServer
) -> None:
    dockerfile = Dockerfile.parse(
        (EXAMPLE / "Dockerfile").read_text(), build_args={"MODEL_ORIGIN": origin}
    )
    assert any("fetch --registry app.models:registry" in cmd for cmd, _ in dockerfile.runs)

    # -- docker build: the RUN steps download every model into the image's cache
    build_output = "\n".join(_build(image, dockerfile))
    for name in MODELS:
        assert model_server.count(f"v1/{name}.safetensors")[0] >= 1
        assert re.search(rf"^{name}\s+downloaded\s", build_output, re.MULTILINE), build_output
    baked = dockerfile.env["MODELCACHE_READ_ONLY_PATHS"]
    assert {p.name for p in image.path(baked).glob("refs/*/*.safetensors")} == {
        f"{name}.safetensors" for name in MODELS
    }

    # -- docker run: the weights are gone from the origin; the image layer must do
    for name in MODELS:
        model_server.remove(f"v1/{name}.safetensors")
    model_server.reset_counts()
    env = dockerfile.env
    assert env["MODELCACHE_OFFLINE"] == "1"
    assert env["MODELCACHE_HOME"] in dockerfile.volumes  # the writable cache is the volume
    layer_before = _snapshot(image.path(baked))
    port = _free_port()
    server = image.sh(_start_command(dockerfile, port), env)
    try:
        wait_for(lambda: server.poll() is not None or _ready(port), timeout=60, what="/ready")
        assert server.poll() is None, server.communicate()
        status, body = _get(f"http://127.0.0.1:{port}/ready")
        assert status == 200

        def all_ready() -> bool:
            states = _get(f"http://127.0.0.1:{port}/models")[1]["models"]
            return all(states[name]["state"] == "ready" for name in MODELS)

        wait_for(all_ready, timeout=30, what="every model ready")
        models = _get(f"http://127.0.0.1:{port}/models")[1]["models"]
        assert {n: (m["state"], m["cache_hit"]) for n, m in models.items()} == {
            n: ("ready", True) for n in MODELS
        }
        assert all(m["path"].startswith(str(image.path(baked))) for m in models.values())
        status, body = _get(f"http://127.0.0.1:{port}/classifier")
        assert status == 200
        assert body["tensors"] > 0
    finally:
        server.terminate()
        _, log = server.communicate(timeout=30)
    assert model_server.requests == {}, f"the container used the network\n{log}"
    assert _snapshot(image.path(baked)) == layer_before, "the read-only layer was written"


def _ready(port: int) -> bool:
    try:
        return _get(f"http://127.0.0.1:{port}/ready")[0] == 200
    except OSError:
        return False


def test_the_start_up_check_fails_fast_when_the_image_was_not_preloaded(
    image: Image, origin: str, model_server: ModelServer
) -> None:
    dockerfile = Dockerfile.parse(
        (EXAMPLE / "Dockerfile").read_text(), build_args={"MODEL_ORIGIN": origin}
    )
    check = _start_command(dockerfile, _free_port()).split("&&")[0]
    assert "--offline" in check
    proc = image.sh(check, dockerfile.env)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "not in the cache and offline mode is on" in err
    assert f"modelcache fetch {origin}/classifier.safetensors" in err
    assert "Traceback" not in err
    assert model_server.requests == {}
