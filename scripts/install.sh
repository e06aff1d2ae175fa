#!/usr/bin/env bash
# Create .venv (if missing) and install modelcache with its development extras.
# torch is pinned and installed first: an unpinned torch would pull a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# openai-whisper without its triton requirement (its other dependencies are in the dev extra)
.venv/bin/python -m pip install -q --no-deps "openai-whisper==20250625"
