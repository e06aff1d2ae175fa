"""examples/low_memory.py runs offline, and docs/small-host.md shows only what it runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "low_memory.py"
DOC = ROOT / "docs" / "small-host.md"


def run_example(workdir: Path, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-W", "error", str(EXAMPLE), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MODELCACHE_PROGRESS": "0", **env},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no torchao chatter, no warnings
    summary: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return summary


def by_stage(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["stage"].split(" ")[0]: row for row in summary["stages"]}


def test_lazy_int8_idle_unload_then_a_warm_second_run(tmp_path: Path) -> None:
    cold = run_example(tmp_path)
    stages = by_stage(cold)
    assert [row["state"] for row in cold["stages"]] == ["not_loaded", "ready", "unloaded", "ready"]
    assert stages["started"]["timings"]["fetch_s"] is None  # lazy: nothing fetched at start
    assert stages["first"]["int8_from_cache"] is False
    assert stages["first"]["quantize_s"] > 0
    assert stages["first"]["weights_after_mib"] < stages["first"]["weights_before_mib"] / 3
    assert stages["next"]["int8_from_cache"] is True  # after the idle unload: from the cache
    assert stages["next"]["quantize_s"] is None
    assert cold["answers"][0] == cold["answers"][1]

    warm = run_example(tmp_path)  # a new process: int8 weights mapped, torchao never imported
    first = by_stage(warm)["first"]
    assert first["int8_from_cache"] is True
    assert first["quantize_s"] is None
    assert first["timings"]["fetch_s"] < 1  # the download is cached too
    assert first["rss_mib"] < stages["first"]["rss_mib"] - 40  # torchao's import is not paid
    assert warm["answers"] == cold["answers"]


def test_quantize_none_from_the_environment_runs_float(tmp_path: Path) -> None:
    summary = run_example(tmp_path, MODELCACHE_QUANTIZE="none")
    first = by_stage(summary)["first"]
    assert first["quantize"] is None
    assert first["weights_after_mib"] is None
    assert [row["state"] for row in summary["stages"]][-2:] == ["unloaded", "ready"]


def test_the_docs_show_only_what_the_example_runs() -> None:
    doc = DOC.read_text()
    example = EXAMPLE.read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", doc, re.S)
    assert blocks, "small-host.md has no code block"
    for language, body in blocks:
        if language == "python":
            assert body in example, f"not in examples/low_memory.py:\n{body}"
        else:
            assert language == "bash"
            for line in body.strip().splitlines():
                command = line.split("#")[0].strip()
                assert command in {
                    "python examples/low_memory.py",
                    "MODELCACHE_QUANTIZE=none python examples/low_memory.py",
                }, command
