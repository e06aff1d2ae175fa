#!/usr/bin/env sh
# Once: fill the volume from a job (or a pod) that has it mounted at $VOLUME.
set -eu
export MODELCACHE_HOME="${VOLUME:-/workspace}/modelcache"
modelcache fetch --registry models:registry   # downloads, verifies and publishes each file
modelcache ls                                 # what the volume now holds
