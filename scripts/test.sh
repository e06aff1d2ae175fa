#!/usr/bin/env bash
# Install everything the tests need (Debian's chromium and docker-registry when missing,
# then .venv), then run the test suite with the venv's interpreter, whatever PATH the caller
# has. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-packages.sh tests   # first: fails fast when it cannot install
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
