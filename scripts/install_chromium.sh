#!/usr/bin/env bash
# Make sure Debian's chromium exists at /usr/bin/chromium, for the browser tests of the web
# page (tests/test_web.py drive it with Playwright's Python package; Playwright's own browser
# download is never used).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
echo "installing chromium (apt-get)..."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
test -x /usr/bin/chromium
