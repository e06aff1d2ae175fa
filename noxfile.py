"""Developer sessions: ``nox -s tests lint typecheck docs bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # pinned and installed first: an unpinned torch pulls a CUDA build


def install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")
    session.install("--no-deps", "openai-whisper==20250625")  # without triton (~1 GB)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    install(session)
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and format check."""
    session.install("ruff")
    paths = ["src", "tests", "examples", "benchmarks", "noxfile.py"]
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


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks side by side and write docs/benchmarks.md (``-- --quick`` for CI)."""
    install(session)
    session.run("python", "benchmarks/run.py", *session.posargs)
