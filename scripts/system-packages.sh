#!/usr/bin/env bash
# Install the Debian packages a step needs, only those whose command is missing.
#   bash scripts/system-packages.sh tests   # chromium (test_page_chromium), docker-registry (test_oci),
#                                           # iproute2's ip (test_replicas: network namespaces)
#   bash scripts/system-packages.sh bench   # nginx (sendfile origin), curl and aria2c: benchmarks/
# As root it runs apt-get, else sudo apt-get; without either it stops and names the packages,
# so a missing tool fails here, loudly, and never turns into a skipped test.
set -euo pipefail

case "${1:-}" in
  tests) wanted=("chromium:chromium" "docker-registry:docker-registry" "ip:iproute2") ;;
  bench) wanted=("nginx:nginx-light" "curl:curl" "aria2c:aria2") ;;
  *)
    echo "usage: $0 tests|bench" >&2
    exit 2
    ;;
esac

missing=()
for pair in "${wanted[@]}"; do
  command=${pair%%:*}
  package=${pair#*:}
  # /usr/sbin is not on every user's PATH (nginx lives there)
  if ! command -v "$command" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$command" ]; then
    missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
elif command -v sudo >/dev/null 2>&1; then
  apt=(sudo env DEBIAN_FRONTEND=noninteractive apt-get)
else
  apt=()
fi
if [ ${#apt[@]} -eq 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing Debian package(s): ${missing[*]}; install them (apt-get install -y ${missing[*]})" >&2
  exit 1
fi
echo "installing Debian package(s): ${missing[*]}" >&2
"${apt[@]}" update -q >/dev/null
"${apt[@]}" install -y -q "${missing[@]}" >/dev/null
