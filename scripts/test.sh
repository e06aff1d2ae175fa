#!/usr/bin/env bash
# Install everything the tests need (.venv, and Debian's chromium when missing), then run the
# test suite with the venv's interpreter, whatever PATH the caller has. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/system-packages.sh tests
exec .venv/bin/python -m pytest "$@"
