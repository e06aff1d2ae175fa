"""examples/volume_cache.py: a writable volume over a read-only layer baked into the image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The example run once, as a user runs it; its work directory and JSON summary."""
    workdir = tmp_path_factory.mktemp("volume-cache")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "volume_cache.py"), "--json", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return workdir, summary


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import volume_cache

    return volume_cache


def test_image_build_fills_the_read_only_layer(run: tuple[Path, dict[str, Any]]) -> None:
    workdir, summary = run
    assert summary["build"]["requests"] == 2
    entries = list((workdir / "opt-models" / "refs").iterdir())
    assert len(entries) == 2


def test_first_start_uses_the_image_layer_in_place_offline(
    run: tuple[Path, dict[str, Any]],
) -> None:
    step = run[1]["first start, offline"]
    assert step["requests"] == 0
    assert step["volume_files"] == 0  # nothing copied (seed 002 copied everything)
    for model in step["models"].values():
        assert (model["state"], model["from"], model["cache_hit"]) == ("ready", "image", True)


def test_a_new_version_goes_to_the_volume_and_stays_there(
    run: tuple[Path, dict[str, Any]],
) -> None:
    _, summary = run
    update = summary["new SAM-2 version"]
    assert update["requests"] >= 1
    assert update["models"]["sam2"]["from"] == "volume"
    assert update["models"]["sam2"]["cache_hit"] is False
    assert update["models"]["groundingdino"]["from"] == "image"
    # the new version only: its blob, its ref (the file's link and meta.json), the layout version
    assert update["volume_files"] == 4

    after = summary["next start, offline"]
    assert after["requests"] == 0
    assert after["models"]["sam2"] == {
        **after["models"]["sam2"],
        "from": "volume",
        "cache_hit": True,
    }
    assert after["models"]["groundingdino"]["from"] == "image"
    assert summary["image_unchanged"] is True


def test_missing_from_both_layers_offline_names_the_fix(
    run: tuple[Path, dict[str, Any]], example: Any, tmp_path: Path
) -> None:
    workdir, summary = run
    origin = summary["origin"]  # its server has stopped: offline must not need it
    env = {
        "MODEL_ORIGIN": origin,
        "MODELCACHE_HOME": str(tmp_path / "empty-volume"),
        "MODELCACHE_READ_ONLY_PATHS": str(workdir / "opt-models"),
        "MODELCACHE_OFFLINE": "1",
        "SAM2_FILE": "sam2.2_hiera_large.pt",
    }
    with pytest.raises(RuntimeError) as caught:
        example.run_step("start", env)
    message = str(caught.value)
    assert "NotCachedError" in message
    assert "model 'sam2'" in message
    assert f"modelcache fetch {origin}/sam2.2_hiera_large.pt" in message
    assert "groundingdino" not in message  # found in the image layer


def test_human_summary(
    run: tuple[Path, dict[str, Any]], example: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    example.show(run[1])
    out = capsys.readouterr().out
    assert "first start, offline: 0 request(s) to the origin, 0 file(s) on the volume" in out
    assert "sam2           ready  from the volume" in out
    assert out.rstrip().endswith("image layer unchanged: True")
