"""Developer sessions: ``nox -s tests lint typecheck docs wheel bench``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # pinned and installed first: an unpinned torch pulls a CUDA build
ROOT = Path(__file__).resolve().parent


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")
    session.install("--no-deps", "openai-whisper==20250625")  # without triton (~1 GB)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    install(session)
    session.run("bash", "scripts/system-packages.sh", "tests", external=True)  # chromium
    session.run("pytest", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """The full soak (tests/test_soak.py): 60 s, figures in soak.json. ``SOAK_SEED=<n>``
    repeats a run; ``-- SECONDS`` sets another length."""
    install(session)
    seconds = session.posargs[0] if session.posargs else "60"
    session.run(
        "pytest",
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
        "tests/test_soak.py::test_soak",
        env={"SOAK_SECONDS": seconds, "SOAK_REPORT": "soak.json"},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff")
    paths = ["src", "tests", "examples", "benchmarks", "scripts", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on src."""
    install(session)
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with --strict."""
    install(session)
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session(reuse_venv=False)
def wheel(session: nox.Session) -> None:
    """Build the wheel, install it with ``[testing,fastapi]`` into this new venv, smoke-test it.

    Everything runs from a temporary folder outside the source tree with no ``PYTHONPATH``, so
    only what the wheel holds is importable (scripts/wheel_smoke.py says what is checked).
    """
    work = Path(tempfile.mkdtemp(prefix="modelcache-wheel-"))
    try:
        dist = work / "dist"
        session.run("python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT))
        (built,) = dist.glob("modelcache-*.whl")
        session.install(TORCH)  # the CPU build on disk, before [testing] asks for torch
        session.install(f"{built}[testing,fastapi]")  # fastapi: the demo's app imports it
        # the smoke test, and the docs' example of a user's tests (docs/testing.md)
        shutil.copy(ROOT / "scripts" / "wheel_smoke.py", work / "test_wheel_smoke.py")
        shutil.copy(ROOT / "examples" / "testing" / "test_my_service.py", work)
        session.chdir(work)
        env = {"PYTHONPATH": "", "MODELCACHE_SOURCE_TREE": str(ROOT), "MODELCACHE_PROGRESS": "0"}
        session.run(
            "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
            "test_wheel_smoke.py", "test_my_service.py", env=env,
        )  # fmt: skip
    finally:
        session.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks side by side and write docs/benchmarks.md (``-- --quick`` for CI)."""
    install(session)
    session.run("bash", "scripts/system-packages.sh", "bench", external=True)  # nginx, curl
    session.run("python", "benchmarks/run.py", *session.posargs)
