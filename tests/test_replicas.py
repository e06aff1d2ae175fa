"""Replicas as hosts: each replica in its own network namespace with its own address, reaching
the origin over a veth pair and a bridge, some sharing one cache directory and some not.

The origin serves each file once per cache directory, and every replica loads the same tensors.
Making the namespaces needs root and ``ip`` (as in CI); without them the test fails and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
from conftest import MiB, wait_for
from safetensors.numpy import save_file
from servers import netns

from modelcache.testing import ModelServer

REPLICAS = 6
#: the cache directory of each replica: four hosts share one volume, two have their own
CACHE_OF = ["shared", "shared", "shared", "shared", "own4", "own5"]
MODELS = {"encoder": 12, "decoder": 4}  # name: MiB

REPLICA = r"""
import hashlib, json, os, socket, sys, time
from urllib.parse import urlsplit

from modelcache import Cache, ModelHandle, TransferOptions

args = json.loads(sys.argv[1])
origin = urlsplit(args["models"][0]["url"])
with socket.create_connection((origin.hostname, origin.port), timeout=10) as probe:
    address = probe.getsockname()[0]  # this host's own address, as the origin sees it
open(args["ready"], "w").close()
while not os.path.exists(args["go"]):
    time.sleep(0.005)
cache = Cache(args["home"], read_only_paths=[], offline=False,
              transfer=TransferOptions(**args["options"]))
digests, hits = {}, {}
for model in args["models"]:
    handle = ModelHandle(model["name"], source=model["url"], sha256=model["sha256"], cache=cache)
    state = handle.get(timeout=120)  # safetensors' torch loader, the default
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    digests[model["name"]] = digest.hexdigest()
    hits[model["name"]] = handle.status()["cache_hit"]
print(json.dumps({"address": address, "digests": digests, "hits": hits}), flush=True)
"""


def _tensor_digest(tensors: dict[str, numpy.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].tobytes())
    return digest.hexdigest()


def _model(path: Path, seed: int, mib: int) -> str:
    """Write a safetensors file of ``mib`` MiB; the digest of its tensors."""
    generator = numpy.random.default_rng(seed)
    n = mib * MiB // 4 // 2
    tensors = {
        "layer.0.weight": generator.standard_normal(n, dtype=numpy.float32),
        "layer.1.weight": generator.standard_normal(n, dtype=numpy.float32),
    }
    save_file(tensors, str(path))
    return _tensor_digest(tensors)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_replicas_on_their_own_hosts_fetch_once_per_cache_and_load_equal_tensors(
    tmp_path: Path,
) -> None:
    problem = netns.why_not()
    if problem is not None:
        pytest.fail(
            f"this test runs each replica in its own network namespace and cannot here: {problem}"
            " (run the suite as root, as CI does)"
        )
    origin_dir = tmp_path / "origin"
    origin_dir.mkdir()
    expected = {}
    with netns.hosts(REPLICAS) as hosts, ModelServer(host=hosts.gateway) as server:
        models = []
        for seed, (name, mib) in enumerate(MODELS.items()):
            path = origin_dir / f"{name}.safetensors"
            expected[name] = _model(path, seed, mib)
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            models.append({"name": name, "url": server.add(path.name, path), "sha256": sha256})
        script = tmp_path / "replica.py"
        script.write_text(REPLICA)
        go = tmp_path / "go"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["MODELCACHE_PROGRESS"] = "0"
        # the default split_below: however the engine judges this loaded origin, no byte twice
        options = {"retries": 3, "backoff": 0.05, "stall_timeout": 30.0, "connect_timeout": 10.0}
        procs = []
        began = time.monotonic()
        try:
            for i in range(REPLICAS):
                args = {
                    "home": str(tmp_path / "caches" / CACHE_OF[i]),
                    "models": models,
                    "options": options,
                    "ready": str(tmp_path / f"ready{i}"),
                    "go": str(go),
                }
                procs.append(
                    subprocess.Popen(
                        [*hosts.run(i), sys.executable, str(script), json.dumps(args)],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=env,
                    )
                )
            # every replica has reached the origin from its own address and waits: start at once
            wait_for(
                lambda: (
                    all((tmp_path / f"ready{i}").exists() for i in range(REPLICAS))
                    or any(p.poll() is not None for p in procs)
                ),
                timeout=120,
                what="the replicas to reach the origin",
            )
            go.touch()
            answers = []
            for i, proc in enumerate(procs):
                out, err = proc.communicate(timeout=240)
                assert proc.returncode == 0, f"replica {i} on {hosts.namespaces[i]} failed: {err}"
                answers.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        took = time.monotonic() - began
        print(f"{REPLICAS} replicas on their own hosts READY in {took:.1f} s")

        assert [a["address"] for a in answers] == hosts.addresses
        for i, answer in enumerate(answers):
            assert answer["digests"] == expected, f"replica {i} loaded other tensors"
        caches = sorted(set(CACHE_OF))
        for name in MODELS:
            size = (origin_dir / f"{name}.safetensors").stat().st_size
            requests, sent = server.count(f"{name}.safetensors")
            assert sent == size * len(caches), (
                f"{name}: the origin sent {sent} bytes in {requests} requests, "
                f"not the file once per cache directory ({len(caches)} x {size})"
            )
            # per cache directory, exactly one replica fetched; the others found it there
            for cache in caches:
                misses = [
                    i
                    for i, a in enumerate(answers)
                    if CACHE_OF[i] == cache and a["hits"][name] is False
                ]
                assert len(misses) == 1, f"{name} in {cache}: fetched by replicas {misses}"
