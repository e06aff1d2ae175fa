"""The benchmark harness: ``benchmarks/run.py --quick`` writes the report, tables and plots.

These check that the harness works (what CI runs), not the figures themselves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"

# The figures of bench_start and bench_replicas: (anchor, a column their table must have).
OWN_FIGURES = {
    "start-import": "torch imported",
    "start-cache-hit": "checks",
    "start-warm-start": "vs bare, per round",
    "start-first-start": "vs torch.hub path",
    "replicas-race": "origin bytes (x file)",
    "replicas-replicas": "origin requests",
}


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 110
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _section(text: str, anchor: str) -> str:
    start = text.index(f"{{ #{anchor} }}")
    following = text.find("\n### ", start)
    following = text.find("\n## ", start) if following == -1 else following
    return text[start:] if following == -1 else text[start:following]


# The harness's own modules in quick mode (every module's quick mode runs in .ci/run, outside
# the test suite, as `benchmarks/run.py --quick`).
@pytest.mark.timeout(200)
def test_quick_run_writes_every_table_and_plot(tmp_path: Path) -> None:
    output = tmp_path / "site" / "benchmarks.md"
    only = "bench_start,bench_replicas"
    proc = _run("--quick", "--only", only, "--output", str(output), timeout=190)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = output.read_text()

    assert text.startswith("# Benchmarks")
    assert "Quick mode" in text
    machine = text[text.index("## The machine") :]
    for fact in ("| CPU |", "| cores |", "| memory |", "| kernel |", "| python |", "| torch |"):
        assert fact in machine

    for anchor, column in OWN_FIGURES.items():
        section = _section(text, anchor)
        header = next(line for line in section.splitlines() if line.startswith("| name |"))
        assert column in header
        assert "median (" in header
        assert re.search(r"^\| \*\*[^|]*modelcache", section, re.M), section
        assert "**What limits this figure:**" in section, section
        image = output.parent / "img" / "benchmarks" / f"{anchor}.png"
        assert f"](img/benchmarks/{anchor}.png)" in section
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    glance = text[text.index("## Goals at a glance") : text.index("\n## ", text.index("## Goals"))]
    assert "cache hit under 5 ms" in glance
    assert "zero requests to the origin" in glance
    assert re.search(r"(✅ met|❌ not met)", glance)

    for module in ("bench_fetch", "bench_s3", "bench_memory", "bench_int8"):
        assert (ROOT / "benchmarks" / f"{module}.py").exists()
        assert f"benchmarks/{module}.py" not in text  # --only left them out, silently


def test_missing_and_failing_modules_are_reported_not_fatal(tmp_path: Path) -> None:
    extra = tmp_path / "modules"
    extra.mkdir()
    (extra / "bench_broken.py").write_text(
        '"""A benchmark that breaks."""\n\n'
        "def run(quick):\n"
        "    raise RuntimeError('the origin went away')\n"
    )
    (extra / "bench_tiny.py").write_text(
        '"""A benchmark with one figure."""\n\n'
        "def run(quick):\n"
        "    return [{'figure': 'tiny', 'name': 'modelcache', 'median': 1.5, 'low': 1.0,\n"
        "             'high': 2.0, 'n': 3, 'unit': 's', 'goal': 'under 2 s', 'met': True}]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(extra)}
    output = tmp_path / "out" / "benchmarks.md"
    proc = _run(
        "--quick",
        "--only",
        "bench_absent,bench_broken,bench_tiny",
        "--output",
        str(output),
        env=env,
        timeout=60,
    )

    assert proc.returncode == 1  # a module failed: CI notices
    text = output.read_text()
    assert "benchmarks/bench_absent.py is not there yet" in text
    assert "This benchmark failed" in text
    assert "RuntimeError: the origin went away" in text
    tiny = _section(text, "tiny-tiny")
    assert "| **modelcache** | 1.50 | 1.00 to 2.00 (3) | ✅ met |" in tiny
    assert "under 2 s" in text[text.index("## Goals at a glance") :]
    assert (output.parent / "img" / "benchmarks" / "tiny-tiny.png").exists()


def _bench_link() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_link
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_link


def test_the_link_benchmark_says_why_when_it_cannot_make_namespaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench_link = _bench_link()
    monkeypatch.setattr(bench_link.os, "geteuid", lambda: 1000)
    rows = bench_link.run(quick=True)
    assert [r["figure"] for r in rows] == ["link-sha256"]
    assert "not measured here: not root" in rows[0]["note"]
    assert rows[0]["median"] > 0


@pytest.mark.timeout(120)
def test_the_link_benchmark_shapes_links_and_removes_its_namespaces() -> None:
    bench_link = _bench_link()
    assert bench_link.why_not() is None, "this machine runs the tests as root with ip, tc, nginx"
    rows = bench_link.run(quick=True)
    rates = {r["name"]: r for r in rows if r["figure"] == "link-rate"}
    # tbf holds curl (one stream, nothing to verify) near each link's rate: 238 and 954 MiB/s
    assert rates["curl -o /dev/null (nothing written) @ 2 Gbit/s"]["median"] < 238 * 1.15
    assert {r["figure"] for r in rows} >= {"link-rate", "link-capped", "link-threads"}
    assert "MainThread" in {r["name"] for r in rows if r["figure"] == "link-threads"}
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"mcb{os.getpid()}" not in namespaces
