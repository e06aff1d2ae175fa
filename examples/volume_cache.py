"""A writable volume cache over a read-only layer baked into the image (seed 002's pattern).

Seed 002 (Modal) baked GroundingDINO and SAM-2 into the image, copied them into a volume on
the first cold start, symlinked them into place and committed the volume. With modelcache the
cache baked into the image is a read-only layer, searched first and never written; the volume
is the writable cache; nothing is copied and nothing is symlinked::

    # Dockerfile, at build time:
    RUN modelcache fetch --registry volume_cache:models --cache /opt/models
    # the container's environment:
    MODELCACHE_READ_ONLY_PATHS=/opt/models   # the layer baked into the image
    MODELCACHE_HOME=/cache                   # the volume

Run it (offline: it writes fake weights and serves them from a local origin)::

    python examples/volume_cache.py [--workdir DIR] [--json]

Four steps, each in its own process as on the platform:

1. image build: ``modelcache fetch --registry`` puts GroundingDINO and SAM-2 into the
   image's cache;
2. first cold start, offline: both are found in the image layer; nothing is downloaded and
   nothing lands on the volume;
3. a new SAM-2 version ships without rebuilding the image: it is downloaded into the volume;
4. the next cold start, offline: GroundingDINO from the image, the new SAM-2 from the volume.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from modelcache import ModelHandle, Registry

MODELS = ("groundingdino_swint_ogc.pth", "sam2_hiera_large.pt", "sam2.1_hiera_large.pt")


# -- the service's code: the same in the image build and in every container ---------------------


def models() -> Registry:
    """The app's models; the sources come from the environment, the caches too."""
    origin = os.environ["MODEL_ORIGIN"]
    sam2 = os.environ.get("SAM2_FILE", "sam2_hiera_large.pt")
    return Registry(
        [
            ModelHandle(
                "groundingdino", source=f"{origin}/groundingdino_swint_ogc.pth", strategy="eager"
            ),
            ModelHandle("sam2", source=f"{origin}/{sam2}", strategy="eager"),
        ]
    )


def cold_start() -> dict[str, Any]:
    """A container's start: load every model, report where each one came from."""
    import torch  # noqa: F401  (imported first, so load_s shows the loading alone)

    registry = models()
    registry.start()  # eager handles: fetch (or find) and load now
    report = {}
    for name in registry:
        status = registry[name].status()
        report[name] = {
            "state": status["state"],
            "cache_hit": status["cache_hit"],
            "path": status["path"],
            "timings": status["timings"],
        }
    registry.close()
    return report


# -- the platform, played on this machine ---------------------------------------------------------


def run_step(step: str, env: dict[str, str]) -> dict[str, Any]:
    """A cold start of a container (``step="start"``) in a fresh process with ``env``."""
    done = subprocess.run(
        [sys.executable, __file__, "--step", step],
        env={**os.environ, "MODELCACHE_PROGRESS": "0", **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"step {step} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def build_image(image: Path, env: dict[str, str]) -> None:
    """The Dockerfile's ``RUN modelcache fetch --registry volume_cache:models --cache ...``."""
    here = Path(__file__).resolve().parent
    command = ["fetch", "--registry", "volume_cache:models", "--cache", str(image)]
    subprocess.run(
        [sys.executable, "-m", "modelcache", *command, "--app-dir", str(here)],
        env={**os.environ, "MODELCACHE_PROGRESS": "0", **env},
        check=True,
        capture_output=True,
    )


def snapshot(directory: Path) -> dict[str, int]:
    """Every file below ``directory`` (locks and temporary files aside) with its size."""
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.parts[-2:])
    }


def where(path: str, image: Path, volume: Path) -> str:
    """``image`` or ``volume``: which cache layer a loaded model's file lives in."""
    for label, layer in (("image", image), ("volume", volume)):
        if Path(path).is_relative_to(layer):
            return label
    return "elsewhere"


def main(workdir: Path) -> dict[str, Any]:
    """Play the four steps in ``workdir``; a summary of what each one did."""
    from modelcache.testing import ModelServer, write_fake_weights

    image, volume, weights = workdir / "opt-models", workdir / "cache", workdir / "weights"
    for directory in (image, volume, weights):
        directory.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    with ModelServer() as origin:
        for seed, name in enumerate(MODELS):
            path = write_fake_weights(
                weights, "state_dict", size_bytes=1 << 20, seed=seed, file_name=name
            )
            origin.add(name, path)
        base = {"MODEL_ORIGIN": origin.url}
        summary["origin"] = origin.url
        container = {
            **base,
            "MODELCACHE_HOME": str(volume),
            "MODELCACHE_READ_ONLY_PATHS": str(image),
        }

        build_image(image, base)
        baked = snapshot(image)
        summary["build"] = {"requests": sum(origin.requests.values()), "image": len(baked)}

        steps = [
            ("first start, offline", {**container, "MODELCACHE_OFFLINE": "1"}),
            ("new SAM-2 version", {**container, "SAM2_FILE": "sam2.1_hiera_large.pt"}),
            (
                "next start, offline",
                {**container, "MODELCACHE_OFFLINE": "1", "SAM2_FILE": "sam2.1_hiera_large.pt"},
            ),
        ]
        for title, env in steps:
            origin.reset_counts()
            report = run_step("start", env)
            summary[title] = {
                "requests": sum(origin.requests.values()),
                "models": {
                    name: {
                        "from": where(info["path"], image, volume),
                        "cache_hit": info["cache_hit"],
                        "state": info["state"],
                        "fetch_s": info["timings"]["fetch_s"],
                        "load_s": info["timings"]["load_s"],
                    }
                    for name, info in report.items()
                },
                "volume_files": len(snapshot(volume)),
            }
        summary["image_unchanged"] = snapshot(image) == baked
    return summary


def show(summary: dict[str, Any]) -> None:
    print(f"image build: {summary['build']['requests']} download(s) into the image layer")
    for title, step in summary.items():
        if not isinstance(step, dict) or "models" not in step:
            continue
        print(
            f"{title}: {step['requests']} request(s) to the origin, "
            f"{step['volume_files']} file(s) on the volume"
        )
        for name, info in step["models"].items():
            print(
                f"  {name:14} {info['state']:6} from the {info['from']:6} "
                f"fetch {info['fetch_s']:.3f}s load {info['load_s']:.3f}s"
            )
    print("image layer unchanged:", summary["image_unchanged"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the image, volume and weights here")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--step", choices=["start"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # inside a "container"
        print(json.dumps(cold_start()))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as scratch:
        result = main(args.workdir or Path(scratch))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
