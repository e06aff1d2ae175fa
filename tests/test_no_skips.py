"""The suite never skips: a skip (a missing package, ``importorskip``, ``skipif``) fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_skip_or_an_importorskip_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_example.py").write_text(
        "import pytest\n"
        "def test_passes():\n    pass\n"
        "def test_skips():\n    pytest.skip('chromium is missing')\n"
        "def test_imports_or_skips():\n    pytest.importorskip('no_such_module_here')\n"
        "@pytest.mark.skipif(True, reason='no numpy')\n"
        "def test_skipif():\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "servers.no_skips",
         "test_example.py"],
        cwd=tmp_path, env={"PYTHONPATH": str(TESTS), "PATH": ""}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    # a skip in the test fails it; a skipif (decided in setup) errors it
    assert done.stdout.splitlines()[-1].startswith("2 failed, 1 passed, 1 error in")
    assert "chromium is missing" in done.stdout
    assert "this suite never skips" in done.stdout
