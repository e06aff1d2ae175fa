#!/usr/bin/env sh
# Once (or in CI when the model changes): copy the CDN's file into your own bucket.
set -eu
modelcache mirror "$SHARP_URL" "$SHARP_MIRROR" --json   # prints the copy's sha256
