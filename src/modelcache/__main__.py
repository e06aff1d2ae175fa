"""``python -m modelcache``: the same as the ``modelcache`` command."""

from __future__ import annotations

from .cli import run

if __name__ == "__main__":
    run()
