#!/usr/bin/env sh
# Every container: read the volume, never the network; fail fast if something is missing.
set -eu
export MODELCACHE_HOME="${VOLUME:-/workspace}/modelcache" MODELCACHE_OFFLINE=1
modelcache fetch --registry models:registry --quiet   # offline: checks that each model is there
exec python models.py                                 # your server: uvicorn app:app ...
