#!/usr/bin/env bash
# The demo service: install into .venv (scripts/install.sh), then serve all-MiniLM-L6-v2
# embeddings with FastAPI + uvicorn, the weights fetched, verified, cached and loaded by
# modelcache from a local origin (offline). Options: --host, --port, --quantize int8,
# --source URL (or $MODEL_SOURCE); `bash scripts/demo.sh --help` lists them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m modelcache.demo "$@"
