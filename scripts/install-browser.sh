#!/bin/sh
# Install Debian's chromium for the console's Playwright tests (tests/webui/test_browser.py).
# Idempotent: does nothing when /usr/bin/chromium (or $MTOR_CHROMIUM) already exists.
# Never runs `playwright install`: the tests drive the distribution's browser.
set -eu
CHROMIUM="${MTOR_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    echo "chromium present: $CHROMIUM"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
"$CHROMIUM" --version
