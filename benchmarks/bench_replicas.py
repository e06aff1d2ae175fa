"""Many processes at once: what the origin serves, and how long until all are READY.

- N processes racing on one cold cache: bytes taken from the origin (goal: the file once);
- many replicas starting at once (users outgrowing one machine): 16 processes as 4 "hosts"
  (4 cache directories, one per host, shared by its 4 processes) against one origin, cold then
  warm: requests and bytes the origin served (goal: once per shared cache when cold, no request
  at all when warm) and the time until every replica is READY.

modelcache's replicas are compared with seed 000's hand-written path
(``torch.hub.load_state_dict_from_url`` into a shared ``model_dir``). The origin is modelcache's
test :class:`~modelcache.testing.ModelServer` in this process, which counts what it sends.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    MiB,
    python,
    row,
    sha256_file,
    spawn,
    summarize,
    with_limits,
    write_checkpoint,
)

LIMITS = {
    "race": "the one download on 127.0.0.1: one process fetches while the others wait on the "
    "entry's lock, then find the entry published.",
    "replicas": "16 processes importing torch and loading on 2 cores; cold and warm differ by "
    "the downloads only, one per host.",
}

MODELCACHE_REPLICA = """
import sys
from modelcache import ModelHandle
url, cache, digest, load = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "load"
handle = ModelHandle("net", source=url, sha256=digest, strategy="eager", cache=cache,
                     loader=None if load else (lambda path: path.stat().st_size))
handle.start()
print("READY", handle.status()["cache_hit"], flush=True)
"""
"""A replica: fetch through the host's cache and load (``torch.load(mmap=True)``) or stat."""

HUB_REPLICA = """
import sys
import torch
url, model_dir = sys.argv[1], sys.argv[2]
state_dict = torch.hub.load_state_dict_from_url(url, model_dir=model_dir, map_location="cpu",
                                                progress=False)
print("READY", flush=True)
"""
"""Seed 000's replica: torch.hub downloads into ``model_dir`` unless the file is there."""

MODELCACHE = "modelcache"
HUB = "torch.hub path (seed 000)"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    env["MODELCACHE_PROGRESS"] = "0"
    return env


def launch(
    contender: str,
    url: str,
    digest: str,
    host_dirs: list[Path],
    per_host: int,
    load: bool,
    server: Any,
    name: str,
) -> dict[str, float]:
    """Start ``per_host`` replicas on each host at once; origin requests, bytes, time to READY."""
    server.reset_counts()
    env = _env()
    began = time.perf_counter()
    procs = []
    for host in host_dirs:
        for _ in range(per_host):
            if contender == MODELCACHE:
                argv = python(
                    MODELCACHE_REPLICA, url, str(host), digest, "load" if load else "stat"
                )
            else:
                argv = python(HUB_REPLICA, url, str(host))
            procs.append(spawn(argv, env=env, measure_rss=False))
    results = [p.wait(900) for p in procs]
    for result in results:
        result.check()
    ready = [p.started + (r.ready_s or r.wall_s) for p, r in zip(procs, results, strict=True)]
    requests, sent = server.count(name)
    return {"s": max(ready) - began, "requests": requests, "bytes": sent}


def _rounds(
    contender: str, rounds: int, hosts: int, per_host: int, warm: bool, root: Path, **kw: Any
) -> list[dict[str, float]]:
    out = []
    for r in range(rounds):
        base = root / f"{contender.split()[0]}-{hosts}x{per_host}-{r}"
        shutil.rmtree(base, ignore_errors=True)
        dirs = [base / f"host{h}" for h in range(hosts)]
        for d in dirs:
            d.mkdir(parents=True)
        cold = launch(contender, host_dirs=dirs, per_host=per_host, **kw)
        out.append({**cold, "phase": 0})
        if warm:
            out.append({**launch(contender, host_dirs=dirs, per_host=per_host, **kw), "phase": 1})
        shutil.rmtree(base, ignore_errors=True)
    return out


def _row(
    figure: str, title: str, name: str, samples: list[dict[str, float]], size: int, **extra: Any
) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "origin requests": int(summarize([s["requests"] for s in samples]).median),
        "origin bytes (x file)": summarize([s["bytes"] for s in samples]).median / size,
    }
    return row(figure, name, [s["s"] for s in samples], unit="s", title=title, **counts, **extra)


def _beyond(worst: float, once: int, size: int) -> dict[str, Any]:
    """The worst round's bytes past the goal (``once`` copies of the file), in KiB: how far a
    round that missed it was, which the median in bytes (x file) does not show."""
    return {"worst round past the goal (KiB)": round(max(0.0, worst - once) * size / 1024)}


def run(quick: bool) -> list[dict[str, Any]]:
    """The race and the replicas figures; fewer processes, small files and one round if quick."""
    from modelcache.testing import ModelServer

    size = 2 * MiB if quick else 256 * MiB
    racers = 3 if quick else 8
    hosts, per_host = (2, 2) if quick else (4, 4)
    rounds = 1 if quick else 3
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, ModelServer() as server:
        root = Path(tmp)
        checkpoint = root / "origin" / "net.pt"
        write_checkpoint(checkpoint, size)
        digest = sha256_file(checkpoint)
        size = checkpoint.stat().st_size
        url = server.add("net.pt", checkpoint)
        common: dict[str, Any] = {
            "url": url,
            "digest": digest,
            "server": server,
            "name": "net.pt",
            "root": root,
        }
        label = f"{size / MiB:.0f} MiB"

        title = f"{racers} processes racing on one cold cache ({label} .pt, fetched, not loaded)"
        goal = f"{racers} processes on one cold entry: the origin serves the file's bytes once"
        for contender in (MODELCACHE, HUB):
            samples = _rounds(contender, rounds, 1, racers, False, load=False, **common)
            extra: dict[str, Any] = {}
            if contender == MODELCACHE:
                worst = max(s["bytes"] for s in samples) / size
                extra = {
                    "goal": goal + " (issue 2)",
                    "met": worst <= 1.0,
                    **_beyond(worst, 1, size),
                }
            rows.append(_row("race", title, contender, samples, size, **extra))

        n = hosts * per_host
        loaded = "fetched, not loaded" if quick else "loaded"
        title = (
            f"{n} replicas as {hosts} hosts starting at once ({label} .pt, {loaded}), "
            "time until all are READY"
        )
        # quick: no torch.hub replicas here (each imports torch: seconds apiece on 2 cores)
        for contender in (MODELCACHE,) if quick else (MODELCACHE, HUB):
            samples = _rounds(contender, rounds, hosts, per_host, True, load=not quick, **common)
            for phase, phase_name in ((0, "cold"), (1, "warm")):
                mine = [s for s in samples if s["phase"] == phase]
                extra = {}
                if contender == MODELCACHE and phase == 0:
                    worst = max(s["bytes"] for s in mine) / size
                    extra = {
                        "goal": f"cold: the file leaves the origin once per shared cache "
                        f"({hosts}x for {hosts} hosts; issue 8)",
                        "met": worst <= hosts,
                        **_beyond(worst, hosts, size),
                    }
                if contender == MODELCACHE and phase == 1:
                    extra = {
                        "goal": "warm: zero requests to the origin (issue 8)",
                        "met": max(s["requests"] for s in mine) == 0,
                    }
                rows.append(
                    _row("replicas", title, f"{contender}, {phase_name}", mine, size, **extra)
                )
        for r in rows:
            if r["figure"] == "replicas":
                r["note"] = (
                    f"Each host is one cache directory shared by its {per_host} processes (a "
                    "node's disk or volume); every process imports torch and loads the weights "
                    "(modelcache: torch.load(mmap=True); torch.hub: torch.load). "
                    "torch.hub has no lock: every replica whose file is not there yet downloads "
                    "the whole file."
                )
    return with_limits(rows, LIMITS)


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=1))
