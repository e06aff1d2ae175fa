#!/usr/bin/env bash
# Create .venv (if missing or broken) and install modelcache with its development extras.
# torch is pinned and installed first: an unpinned torch would pull a CUDA build of several GB.
# The interpreter: $PYTHON if set, else python3.11 (the CPU torch wheel is built for it), else
# python3; it must be 3.10 or newer. Nothing here relies on the caller's PATH afterwards: every
# later step runs .venv/bin/python. Re-running is quick: the pip steps run again only when
# pyproject.toml or this script changed (rm -rf .venv starts over).
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  local candidate candidates=(python3.11 python3)
  [ -n "${PYTHON:-}" ] && candidates=("$PYTHON")
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  echo "no Python 3.10+ found (tried: ${candidates[*]}); set PYTHON=/path/to/python3" >&2
  return 1
}

if ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
  PY=$(pick_python)
  rm -rf .venv
  if ! "$PY" -m venv .venv; then
    # Debian and Ubuntu ship venv's pip bootstrap separately
    echo "$PY -m venv failed; on Debian: apt-get install -y python3-venv" >&2
    exit 1
  fi
fi

stamp=.venv/.modelcache-installed
wanted=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# openai-whisper without its triton requirement (its other dependencies are in the dev extra)
.venv/bin/python -m pip install -q --no-deps "openai-whisper==20250625"
# the fast loaders benchmarks/bench_load.py measures modelcache against, without letting them
# touch torch (their other needs, numpy, humanize and typer, are already there)
.venv/bin/python -m pip install -q --no-deps "runai-model-streamer==0.17.1" "fastsafetensors==0.5.0"
echo "$wanted" >"$stamp"
