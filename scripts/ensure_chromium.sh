#!/usr/bin/env bash
# Make sure a headless Chromium is installed: the browser tests (tests/ui) and `make screenshots`
# drive one. `make test` and `make screenshots` run this first. Installs the Debian packages when
# Chromium is missing and this is a Debian machine run as root; otherwise says what to install
# (the browser test then fails with the same hint).
set -euo pipefail

if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
    || command -v google-chrome >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "• Chromium is missing: installing it (apt-get install -y chromium chromium-driver)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver
    exit 0
fi
echo "warning: no Chromium found, and this is not a Debian machine run as root: install Chromium" \
     "(e.g. sudo apt-get install -y chromium chromium-driver); the browser tests (tests/ui) fail" \
     "without it" >&2
