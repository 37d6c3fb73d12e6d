#!/usr/bin/env bash
# Make sure a redis-server binary exists (Debian's package). Starting it is left to
# scripts/run_local.sh and the test suite, each on the port it needs.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
echo "installing redis-server (apt-get)..."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
command -v redis-server >/dev/null
