#!/usr/bin/env bash
# A Docker Engine for `make images` and the compose test: Debian's docker.io (Engine 20.10) and
# debootstrap (for a local base image where no registry answers), installed when missing; the
# daemon started by hand when none answers (these machines have no systemd). Idempotent.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing docker.io and debootstrap (apt-get)..."
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if docker info >/dev/null 2>&1; then
    exit 0
fi
log="$(dirname "$0")/../.cache/dockerd.log"
mkdir -p "$(dirname "$log")"
echo "starting dockerd (log: .cache/dockerd.log)"
$SUDO setsid dockerd >"$log" 2>&1 </dev/null &
for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then exit 0; fi
    sleep 0.5
done
echo "dockerd did not answer within 30 s; see $log" >&2
exit 1
